/* test_safetensors_write.c: safetensors files and sharded checkpoints as
 * written by the core, read back here with plain reads and cJSON (not the
 * writer's code): header fields, alignment, bytes, shard boundaries, the
 * index, atomic replacement and the errors that name what is at fault. */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "check.h"
#include "device.h"
#include "pool.h"
#include "safetensors_write.h"
#include "tensor.h"

static char root[256];

/* A fresh directory for one case, under the test's own temporary root. */
static const char *case_dir(const char *name)
{
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", root, name);
    mkdir(dir, 0777);
    return dir;
}

static void remove_tree(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        const struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            char sub[1024];
            snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
            remove_tree(sub);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* Entries of dir, not counting . and .. */
static int count_entries(const char *dir, int hidden_only)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (!hidden_only || e->d_name[0] == '.') n++;
    }
    closedir(d);
    return n;
}

static int exists(const char *dir, const char *name)
{
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return access(p, F_OK) == 0;
}

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* A safetensors file as read back: the header object and the data region. */
typedef struct st_read {
    unsigned char *file;
    size_t file_len;
    uint64_t header_len;
    cJSON *header;
    const unsigned char *data;
    size_t data_len;
} st_read;

static int st_load(st_read *r, const char *path)
{
    memset(r, 0, sizeof *r);
    r->file = read_all(path, &r->file_len);
    if (!r->file || r->file_len < 8) return 0;
    for (int i = 0; i < 8; i++) r->header_len |= (uint64_t)r->file[i] << (8 * i);
    if (r->header_len > r->file_len - 8) return 0;
    r->header = cJSON_ParseWithLength((const char *)r->file + 8, (size_t)r->header_len);
    r->data = r->file + 8 + r->header_len;
    r->data_len = r->file_len - 8 - (size_t)r->header_len;
    return r->header != NULL;
}

static void st_unload(st_read *r)
{
    cJSON_Delete(r->header);
    free(r->file);
    memset(r, 0, sizeof *r);
}

static void fill_pattern(ws_tensor *t, unsigned seed)
{
    unsigned char *p = ws_tensor_data(t);
    size_t n = ws_tensor_nbytes(t);
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 131u + seed * 17u + (i >> 8));
}

static ws_status make(ws_tensor *t, ws_dtype dt, int ndim, const int64_t *shape, unsigned seed)
{
    ws_status rc = ws_tensor_empty(t, dt, ndim, shape, NULL);
    if (rc == WS_OK) fill_pattern(t, seed);
    return rc;
}

static uint64_t json_u64(const cJSON *v) { return cJSON_IsNumber(v) ? (uint64_t)v->valuedouble : ~0ull; }

/* Checks entry `name` of r against tensor t at data offset *at (back to back). */
static void check_entry(const st_read *r, const char *name, const char *dtype,
                        const ws_tensor *t, uint64_t *at)
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(r->header, name);
    CHECK(cJSON_IsObject(e));
    if (!cJSON_IsObject(e)) return;
    CHECK(cJSON_GetArraySize(e) == 3);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    CHECK(cJSON_IsString(dt) && strcmp(dt->valuestring, dtype) == 0);
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    CHECK(cJSON_IsArray(shape) && cJSON_GetArraySize(shape) == t->layout.ndim);
    for (int d = 0; d < t->layout.ndim && cJSON_IsArray(shape); d++)
        CHECK_EQ_U64(json_u64(cJSON_GetArrayItem(shape, d)), t->layout.shape[d]);
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    CHECK(cJSON_IsArray(off) && cJSON_GetArraySize(off) == 2);
    uint64_t b = json_u64(cJSON_GetArrayItem(off, 0)), end = json_u64(cJSON_GetArrayItem(off, 1));
    size_t nbytes = ws_tensor_nbytes(t);
    CHECK_EQ_U64(b, *at);
    CHECK_EQ_U64(end - b, nbytes);
    CHECK(end <= r->data_len);
    if (end <= r->data_len && end - b == nbytes)
        CHECK(memcmp(r->data + b, ws_tensor_data(t), nbytes) == 0);
    *at = end;
}

static void check_metadata(const st_read *r, const char *const *kv, size_t n)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(r->header, "__metadata__");
    CHECK(cJSON_IsObject(m) && cJSON_GetArraySize(m) == (int)n);
    for (size_t i = 0; i < n && m; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, kv[2 * i]);
        CHECK(cJSON_IsString(v) && strcmp(v->valuestring, kv[2 * i + 1]) == 0);
    }
}

static void test_every_dtype(void)
{
    const char *dir = case_dir("dtypes");
    static const struct { ws_dtype dt; const char *name; } kinds[] = {
        {WS_F32, "F32"}, {WS_BF16, "BF16"}, {WS_F16, "F16"}, {WS_FP8E4M3, "F8_E4M3"},
        {WS_U8, "U8"},   {WS_I32, "I32"},   {WS_I64, "I64"}};
    enum { K = 7 };
    ws_tensor ts[K + 1];
    const ws_tensor *tp[K + 1];
    const char *names[K + 1] = {"model.f32", "model.bf16", "model.f16", "model.fp8",
                                "model.u8",  "model.i32",  "model.i64", "scalar"};
    /* Odd sizes so that no tensor but the first starts 8-byte aligned by luck. */
    int64_t shapes[K][3] = {{3, 5, 1}, {7, 3, 1}, {1, 1, 13}, {5, 7, 1}, {11, 1, 1},
                            {2, 2, 3}, {3, 1, 1}};
    for (int i = 0; i < K; i++) {
        CHECK_OK(make(&ts[i], kinds[i].dt, 3 - (i % 2), shapes[i], (unsigned)i));
        tp[i] = &ts[i];
    }
    CHECK_OK(make(&ts[K], WS_F32, 0, NULL, 99));
    tp[K] = &ts[K];
    const char *meta[] = {"format", "pt", "note", "caf\xc3\xa9 \"quoted\""};
    char path[1024];
    snprintf(path, sizeof path, "%s/all.safetensors", dir);
    CHECK_OK(ws_st_write(path, K + 1, names, tp, 2, meta, 0, NULL, NULL));
    st_read r;
    CHECK(st_load(&r, path));
    if (r.header) {
        CHECK_EQ_U64(r.header_len % 8, 0);
        /* The JSON ends with '}', then only the padding spaces. */
        const char *h = (const char *)r.file + 8;
        size_t end = (size_t)r.header_len;
        while (end && h[end - 1] == ' ') end--;
        CHECK(end && h[end - 1] == '}' && r.header_len - end < 8);
        CHECK(cJSON_GetArraySize(r.header) == K + 2);
        CHECK(strcmp(r.header->child->string, "__metadata__") == 0);
        check_metadata(&r, meta, 2);
        uint64_t at = 0;
        for (int i = 0; i < K; i++) check_entry(&r, names[i], kinds[i].name, &ts[i], &at);
        check_entry(&r, "scalar", "F32", &ts[K], &at);
        CHECK_EQ_U64(at, r.data_len);
    }
    st_unload(&r);
    CHECK(count_entries(dir, 1) == 0);
    for (int i = 0; i <= K; i++) ws_tensor_free(&ts[i]);
}

static void test_no_metadata_and_empty(void)
{
    const char *dir = case_dir("empty");
    char path[1024];
    snprintf(path, sizeof path, "%s/none.safetensors", dir);
    CHECK_OK(ws_st_write(path, 0, NULL, NULL, 0, NULL, 0, NULL, NULL));
    st_read r;
    CHECK(st_load(&r, path));
    CHECK(r.header && cJSON_GetArraySize(r.header) == 0 && r.data_len == 0);
    CHECK_EQ_U64(r.header_len, 8); /* "{}" and six spaces */
    st_unload(&r);

    /* Zero-size tensors take no bytes and sit between the others. */
    ws_tensor a, z, b;
    int64_t sa[] = {3}, sz[] = {0, 4}, sb[] = {2};
    CHECK_OK(make(&a, WS_BF16, 1, sa, 1));
    CHECK_OK(make(&z, WS_F32, 2, sz, 2));
    CHECK_OK(make(&b, WS_I64, 1, sb, 3));
    const ws_tensor *tp[] = {&a, &z, &b};
    const char *names[] = {"a", "z", "b"};
    snprintf(path, sizeof path, "%s/zero.safetensors", dir);
    CHECK_OK(ws_st_write(path, 3, names, tp, 0, NULL, 0, NULL, NULL));
    CHECK(st_load(&r, path));
    if (r.header) {
        CHECK(cJSON_GetObjectItemCaseSensitive(r.header, "__metadata__") == NULL);
        uint64_t at = 0;
        check_entry(&r, "a", "BF16", &a, &at);
        CHECK_EQ_U64(at, 6);
        check_entry(&r, "z", "F32", &z, &at);
        CHECK_EQ_U64(at, 6);
        check_entry(&r, "b", "I64", &b, &at);
        CHECK_EQ_U64(at, r.data_len);
    }
    st_unload(&r);
    ws_tensor_free(&a);
    ws_tensor_free(&z);
    ws_tensor_free(&b);
}

typedef struct progress_log {
    int calls, stop_at;
    uint64_t last_done, total;
    int monotonic;
} progress_log;

static int on_progress(uint64_t done, uint64_t total, void *ctx)
{
    progress_log *p = ctx;
    if (done < p->last_done || done > total) p->monotonic = 0;
    p->last_done = done;
    p->total = total;
    return ++p->calls == p->stop_at;
}

static void test_chunks_and_progress(void)
{
    const char *dir = case_dir("progress");
    ws_tensor a, b;
    int64_t sa[] = {1000}, sb[] = {77};
    CHECK_OK(make(&a, WS_F32, 1, sa, 5));
    CHECK_OK(make(&b, WS_U8, 1, sb, 6));
    const ws_tensor *tp[] = {&a, &b};
    const char *names[] = {"a", "b"};
    char path[1024];
    snprintf(path, sizeof path, "%s/p.safetensors", dir);
    /* A staging size that divides nothing: chunks end mid-element. */
    progress_log log = {.monotonic = 1};
    CHECK_OK(ws_st_write(path, 2, names, tp, 0, NULL, 333, on_progress, &log));
    CHECK(log.monotonic && log.last_done == 4077 && log.total == 4077);
    CHECK(log.calls >= 4077 / 333 && log.calls <= 4077 / 333 + 3);
    st_read r;
    CHECK(st_load(&r, path));
    uint64_t at = 0;
    if (r.header) {
        check_entry(&r, "a", "F32", &a, &at);
        check_entry(&r, "b", "U8", &b, &at);
    }
    st_unload(&r);

    /* Stopped by its callback: the old file stays as it was, no temporary is left. */
    size_t before_len, after_len;
    unsigned char *before = read_all(path, &before_len);
    fill_pattern(&a, 77);
    progress_log stop = {.monotonic = 1, .stop_at = 2};
    CHECK_ERR(ws_st_write(path, 2, names, tp, 0, NULL, 333, on_progress, &stop),
              WS_ERR_INTERRUPTED, "stopped by the progress callback");
    CHECK(stop.calls == 2);
    unsigned char *after = read_all(path, &after_len);
    CHECK(before && after && before_len == after_len && memcmp(before, after, before_len) == 0);
    CHECK(count_entries(dir, 1) == 0);
    CHECK(count_entries(dir, 0) == 1);
    free(before);
    free(after);
    ws_tensor_free(&a);
    ws_tensor_free(&b);
}

static void test_misuse(void)
{
    const char *dir = case_dir("misuse");
    ws_tensor m, v, ok;
    int64_t sm[] = {4, 6}, so[] = {3};
    CHECK_OK(make(&m, WS_F32, 2, sm, 1));
    CHECK_OK(ws_tensor_narrow(&v, &m, 1, 1, 3));
    CHECK_OK(make(&ok, WS_F32, 1, so, 2));
    char path[1024];
    snprintf(path, sizeof path, "%s/x.safetensors", dir);
    const ws_tensor *tp[] = {&ok, &v};
    const char *names[] = {"fine", "layers.0.strided"};
    CHECK_ERR(ws_st_write(path, 2, names, tp, 0, NULL, 0, NULL, NULL), WS_ERR_ARG,
              "'layers.0.strided'");
    CHECK(strstr(ws_errmsg(), "not contiguous") != NULL);
    const ws_tensor *tp2[] = {&ok, &m, &ok};
    const char *dup[] = {"w", "x", "w"};
    CHECK_ERR(ws_st_write(path, 3, dup, tp2, 0, NULL, 0, NULL, NULL), WS_ERR_ARG,
              "tensor name 'w' is given twice (items 1 and 3)");
    const char *reserved[] = {"__metadata__"};
    CHECK_ERR(ws_st_write(path, 1, reserved, tp, 0, NULL, 0, NULL, NULL), WS_ERR_ARG,
              "'__metadata__'");
    const char *empty[] = {""};
    CHECK_ERR(ws_st_write(path, 1, empty, tp, 0, NULL, 0, NULL, NULL), WS_ERR_ARG,
              "tensor 1 has an empty name");
    const char *bad_utf8[] = {"w\xff"};
    CHECK_ERR(ws_st_write(path, 1, bad_utf8, tp, 0, NULL, 0, NULL, NULL), WS_ERR_ARG,
              "not valid UTF-8");
    const char *meta[] = {"k", "1", "k", "2"};
    CHECK_ERR(ws_st_write(path, 1, names, tp, 2, meta, 0, NULL, NULL), WS_ERR_ARG,
              "metadata key 'k' is given twice");
    /* A directory in the way of the target: the rename fails, nothing is left. */
    CHECK_ERR(ws_st_write(dir, 0, NULL, NULL, 0, NULL, 0, NULL, NULL), WS_ERR_IO, "renaming");
    CHECK(count_entries(root, 1) == 0);
    ws_tensor freed;
    CHECK_OK(make(&freed, WS_F32, 1, so, 3));
    ws_tensor_release(&freed);
    const ws_tensor *tp3[] = {&freed};
    CHECK_ERR(ws_st_write(path, 1, names, tp3, 0, NULL, 0, NULL, NULL), WS_ERR_FREED,
              "tensor 1, 'fine'");
    char trailing[1024];
    snprintf(trailing, sizeof trailing, "%s/", dir);
    CHECK_ERR(ws_st_write(trailing, 0, NULL, NULL, 0, NULL, 0, NULL, NULL), WS_ERR_ARG,
              "names no file");
    /* Nothing was written by any of these. */
    CHECK(count_entries(dir, 0) == 0);
    ws_tensor_free(&freed);
    ws_tensor_free(&v);
    ws_tensor_free(&m);
    ws_tensor_free(&ok);
}

static void test_io_errors(void)
{
    const char *dir = case_dir("io");
    ws_tensor t;
    int64_t s[] = {16};
    CHECK_OK(make(&t, WS_F32, 1, s, 1));
    const ws_tensor *tp[] = {&t};
    const char *names[] = {"w"};
    char path[1024];
    snprintf(path, sizeof path, "%s/missing/x.safetensors", dir);
    CHECK_ERR(ws_st_write(path, 1, names, tp, 0, NULL, 0, NULL, NULL), WS_ERR_IO, path);
    CHECK(strstr(ws_errmsg(), "No such file or directory") != NULL);
    CHECK(strstr(ws_errmsg(), "does not exist") != NULL);

    /* A directory this process may not write: read-only for a normal user;
     * root writes anywhere a mode allows, but not into /sys. */
    char ro[512];
    snprintf(ro, sizeof ro, "%s/readonly", dir);
    mkdir(ro, 0555);
    chmod(ro, 0555);
    if (geteuid() == 0)
        snprintf(path, sizeof path, "/sys/ws-test-%ld.safetensors", (long)getpid());
    else
        snprintf(path, sizeof path, "%s/x.safetensors", ro);
    CHECK_ERR(ws_st_write(path, 1, names, tp, 0, NULL, 0, NULL, NULL), WS_ERR_IO, path);
    CHECK(strstr(ws_errmsg(), "cannot create the temporary file") != NULL);
    CHECK(access(path, F_OK) != 0);
    chmod(ro, 0755);
    CHECK(count_entries(ro, 0) == 0);

    /* A file where a directory should be. */
    char file[512];
    snprintf(file, sizeof file, "%s/plain", dir);
    FILE *f = fopen(file, "w");
    if (f) fclose(f);
    snprintf(path, sizeof path, "%s/x.safetensors", file);
    CHECK_ERR(ws_st_write(path, 1, names, tp, 0, NULL, 0, NULL, NULL), WS_ERR_IO, path);
    CHECK(strstr(ws_errmsg(), "Not a directory") != NULL);
    CHECK_ERR(ws_st_save_sharded(file, NULL, 1, names, tp, 0, 0, NULL, 0, NULL, NULL, NULL),
              WS_ERR_IO, "is not a directory");
    ws_tensor_free(&t);
}

/* Reads the index of a checkpoint in dir: the weight map and the total. */
static cJSON *load_index(const char *dir, const char *prefix)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.safetensors.index.json", dir, prefix);
    size_t len;
    unsigned char *text = read_all(path, &len);
    cJSON *j = text ? cJSON_ParseWithLength((const char *)text, len) : NULL;
    free(text);
    return j;
}

/* Saves tensors of the given byte sizes (u8 [size]) with max_shard_bytes and
 * checks the shards hold them in the expected groups (shard of each tensor). */
static void check_sharding(const char *dir, const size_t *sizes, size_t n, uint64_t max,
                           const size_t *expect_shard, size_t expect_n)
{
    ws_tensor ts[8];
    const ws_tensor *tp[8];
    char namebuf[8][48];
    const char *names[8];
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t s = (int64_t)sizes[i];
        CHECK_OK(make(&ts[i], WS_U8, 1, &s, (unsigned)i));
        tp[i] = &ts[i];
        snprintf(namebuf[i], sizeof namebuf[i], "layer.%zu.weight", i);
        names[i] = namebuf[i];
        total += sizes[i];
    }
    const char *meta[] = {"producer", "wshost"};
    size_t n_shards = 0;
    CHECK_OK(ws_st_save_sharded(dir, "model", n, names, tp, max, 1, meta, 7, NULL, NULL,
                                &n_shards));
    CHECK_EQ_U64(n_shards, expect_n);
    cJSON *index = load_index(dir, "model");
    CHECK((index != NULL) == (expect_n > 1));
    if (index) {
        CHECK(cJSON_GetArraySize(index) == 2);
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(index, "metadata");
        CHECK(cJSON_GetArraySize(m) == 1);
        CHECK_EQ_U64(json_u64(cJSON_GetObjectItemCaseSensitive(m, "total_size")), total);
        CHECK(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(index, "weight_map")) ==
              (int)n);
    }
    const char *pt_meta[] = {"format", "pt", "producer", "wshost"};
    for (size_t s = 0; s < expect_n; s++) {
        char file[256], path[1024];
        if (expect_n == 1)
            snprintf(file, sizeof file, "model.safetensors");
        else
            snprintf(file, sizeof file, "model-%05zu-of-%05zu.safetensors", s + 1, expect_n);
        snprintf(path, sizeof path, "%s/%s", dir, file);
        st_read r;
        CHECK(st_load(&r, path));
        if (!r.header) continue;
        check_metadata(&r, pt_meta, 2);
        uint64_t at = 0;
        int in_shard = 0;
        for (size_t i = 0; i < n; i++) {
            if (expect_shard[i] != s) continue;
            in_shard++;
            check_entry(&r, names[i], "U8", &ts[i], &at);
            if (index) {
                const cJSON *w = cJSON_GetObjectItemCaseSensitive(
                    cJSON_GetObjectItemCaseSensitive(index, "weight_map"), names[i]);
                CHECK(cJSON_IsString(w) && strcmp(w->valuestring, file) == 0);
            }
        }
        CHECK(cJSON_GetArraySize(r.header) == in_shard + 1);
        CHECK_EQ_U64(at, r.data_len);
        st_unload(&r);
    }
    cJSON_Delete(index);
    CHECK(count_entries(dir, 1) == 0);
    for (size_t i = 0; i < n; i++) ws_tensor_free(&ts[i]);
}

static void test_sharding(void)
{
    /* Exact fits stay together; the next tensor starts a shard. */
    const size_t fit[] = {40, 60, 100, 30}, fit_shard[] = {0, 0, 1, 2};
    check_sharding(case_dir("fit"), fit, 4, 100, fit_shard, 3);
    /* A tensor over the limit gets a shard of its own, in order. */
    const size_t big[] = {50, 250, 20, 30}, big_shard[] = {0, 1, 2, 2};
    check_sharding(case_dir("oversize"), big, 4, 100, big_shard, 3);
    /* The first tensor alone over the limit. */
    const size_t first[] = {150, 10}, first_shard[] = {0, 1};
    check_sharding(case_dir("first"), first, 2, 100, first_shard, 2);
    /* Everything fits: one file, no index. */
    const size_t one[] = {10, 20, 30}, one_shard[] = {0, 0, 0};
    check_sharding(case_dir("one"), one, 3, 100, one_shard, 1);
    CHECK(count_entries(case_dir("one"), 0) == 1);
}

/* A save replaces an earlier one under the same prefix: files a loader
 * would pick up instead (the single file, the index, shards of another
 * count) go; other files stay. */
static void test_replaces_earlier_save(void)
{
    const char *dir = case_dir("replace");
    char d[512];
    snprintf(d, sizeof d, "%s", dir);
    ws_tensor ts[3];
    const ws_tensor *tp[3];
    const char *names[] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++) {
        int64_t s = 64;
        CHECK_OK(make(&ts[i], WS_U8, 1, &s, (unsigned)i));
        tp[i] = &ts[i];
    }
    const char *keep[] = {"other-00001-of-00002.safetensors", "model-00001-of-002.safetensors",
                          "model.txt", "config.json"};
    for (int i = 0; i < 4; i++) {
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", d, keep[i]);
        FILE *f = fopen(p, "w");
        if (f) fclose(f);
    }
    size_t ns = 0;
    CHECK_OK(ws_st_save_sharded(d, "model", 3, names, tp, 64, 0, NULL, 0, NULL, NULL, &ns));
    CHECK(ns == 3 && exists(d, "model-00003-of-00003.safetensors"));
    CHECK(exists(d, "model.safetensors.index.json"));
    CHECK_OK(ws_st_save_sharded(d, "model", 3, names, tp, 128, 0, NULL, 0, NULL, NULL, &ns));
    CHECK(ns == 2 && exists(d, "model-00002-of-00002.safetensors"));
    CHECK(!exists(d, "model-00001-of-00003.safetensors"));
    CHECK(!exists(d, "model-00003-of-00003.safetensors"));
    CHECK(count_entries(d, 0) == 4 + 3);
    CHECK_OK(ws_st_save_sharded(d, "model", 3, names, tp, 0, 0, NULL, 0, NULL, NULL, &ns));
    CHECK(ns == 1 && exists(d, "model.safetensors"));
    CHECK(!exists(d, "model.safetensors.index.json"));
    CHECK(!exists(d, "model-00001-of-00002.safetensors"));
    CHECK(count_entries(d, 0) == 4 + 1);
    CHECK_OK(ws_st_save_sharded(d, "model", 3, names, tp, 100, 0, NULL, 0, NULL, NULL, &ns));
    CHECK(ns == 3 && !exists(d, "model.safetensors"));
    CHECK(count_entries(d, 0) == 4 + 4);
    for (int i = 0; i < 4; i++) CHECK(exists(d, keep[i]));

    /* A missing directory is created, parents included. */
    char deep[1024];
    snprintf(deep, sizeof deep, "%s/new/nested", d);
    CHECK_OK(ws_st_save_sharded(deep, "adapter", 1, names, tp, 0, 0, NULL, 0, NULL, NULL, &ns));
    CHECK(exists(deep, "adapter.safetensors"));
    char name[64];
    CHECK(ws_st_shard_filename(name, sizeof name, "m", 1, 12) == 28 &&
          strcmp(name, "m-00002-of-00012.safetensors") == 0);
    CHECK(ws_st_index_filename(name, sizeof name, "m") > 0 &&
          strcmp(name, "m.safetensors.index.json") == 0);
    for (int i = 0; i < 3; i++) ws_tensor_free(&ts[i]);
}

/* A stop in the middle of a sharded save leaves complete shards but no index. */
static void test_sharded_interrupted(void)
{
    const char *dir = case_dir("sharded_stop");
    ws_tensor ts[3];
    const ws_tensor *tp[3];
    const char *names[] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++) {
        int64_t s = 100;
        CHECK_OK(make(&ts[i], WS_U8, 1, &s, (unsigned)i));
        tp[i] = &ts[i];
    }
    progress_log stop = {.monotonic = 1, .stop_at = 2};
    CHECK_ERR(ws_st_save_sharded(dir, "model", 3, names, tp, 100, 0, NULL, 100, on_progress,
                                 &stop, NULL),
              WS_ERR_INTERRUPTED, "model-00002-of-00003.safetensors");
    CHECK(exists(dir, "model-00001-of-00003.safetensors"));
    CHECK(!exists(dir, "model-00002-of-00003.safetensors"));
    CHECK(!exists(dir, "model.safetensors.index.json"));
    CHECK(count_entries(dir, 1) == 0);
    for (int i = 0; i < 3; i++) ws_tensor_free(&ts[i]);
}

/* Device tensors go through the staging buffer in chunks. */
static void test_device_tensors(void)
{
    if (ws_device_cuda_count() == 0) SKIP("no usable GPU");
    ws_device *gpu = NULL;
    CHECK_OK(ws_device_get("cuda", &gpu));
    if (!gpu) return;
    const char *dir = case_dir("device");
    ws_tensor host[2], dev[2];
    int64_t s0[] = {1000, 3}, s1[] = {5};
    CHECK_OK(make(&host[0], WS_BF16, 2, s0, 1));
    CHECK_OK(make(&host[1], WS_I64, 1, s1, 2));
    const ws_tensor *tp[3];
    for (int i = 0; i < 2; i++) {
        ws_tensor_opts o = {.device = gpu};
        CHECK_OK(ws_tensor_empty(&dev[i], host[i].dtype, host[i].layout.ndim, host[i].layout.shape,
                                 &o));
        CHECK_OK(ws_tensor_copy(&dev[i], &host[i]));
        tp[i] = &dev[i];
    }
    tp[2] = &host[1];
    const char *names[] = {"gpu.bf16", "gpu.i64", "cpu.i64"};
    char path[1024];
    snprintf(path, sizeof path, "%s/gpu.safetensors", dir);
    progress_log log = {.monotonic = 1};
    CHECK_OK(ws_st_write(path, 3, names, tp, 0, NULL, 1000, on_progress, &log));
    CHECK(log.monotonic && log.last_done == 6080);
    st_read r;
    CHECK(st_load(&r, path));
    uint64_t at = 0;
    if (r.header) {
        check_entry(&r, "gpu.bf16", "BF16", &host[0], &at);
        check_entry(&r, "gpu.i64", "I64", &host[1], &at);
        check_entry(&r, "cpu.i64", "I64", &host[1], &at);
    }
    st_unload(&r);
    for (int i = 0; i < 2; i++) {
        ws_tensor_free(&dev[i]);
        ws_tensor_free(&host[i]);
    }
}

/* A progress callback that frees the tensor being saved, or puts its pool to
 * sleep: the save fails naming the tensor, and publishes nothing. */
typedef struct interfere {
    ws_tensor *free_me;
    ws_pool *sleep_me;
    int calls;
} interfere;

static int on_progress_interfere(uint64_t done, uint64_t total, void *ctx)
{
    (void)done;
    (void)total;
    interfere *x = ctx;
    if (x->calls++ == 0) {
        if (x->free_me) ws_tensor_free(x->free_me);
        if (x->sleep_me) CHECK_OK(ws_pool_sleep(x->sleep_me, 2, "mid-save"));
    }
    return 0;
}

static void test_tensor_gone_mid_save(void)
{
    const char *dir = case_dir("gone");
    char path[1024];
    snprintf(path, sizeof path, "%s/g.safetensors", dir);
    const char *names[] = {"a", "layers.0.w"};
    ws_tensor a, b;
    int64_t sa[] = {10}, sb[] = {1 << 18}; /* 1 MiB: its own mapping, unmapped when freed */
    CHECK_OK(make(&a, WS_U8, 1, sa, 1));
    CHECK_OK(make(&b, WS_F32, 1, sb, 2));
    const ws_tensor *tp[] = {&a, &b};
    interfere x = {.free_me = &b};
    CHECK_ERR(ws_st_write(path, 2, names, tp, 0, NULL, 4096, on_progress_interfere, &x),
              WS_ERR_FREED, "'layers.0.w'");
    CHECK(strstr(ws_errmsg(), "was freed") != NULL);
    CHECK(count_entries(dir, 0) == 0);

    /* The same through a pool put to sleep (its pages are gone). */
    ws_pool *pool = NULL;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "save", 4 << 20, &pool));
    if (!pool) return;
    ws_tensor_opts in_pool = {.pool = pool};
    CHECK_OK(ws_tensor_empty(&b, WS_F32, 1, sb, &in_pool));
    CHECK_OK(ws_tensor_fill(&b, 1.0));
    x = (interfere){.sleep_me = pool};
    CHECK_ERR(ws_st_write(path, 2, names, tp, 0, NULL, 4096, on_progress_interfere, &x),
              WS_ERR_DISCARDED, "'layers.0.w'");
    CHECK(count_entries(dir, 0) == 0);
    CHECK_OK(ws_pool_wake(pool));
    ws_tensor_free(&b);
    CHECK_OK(ws_pool_destroy(pool));
    ws_tensor_free(&a);
}

/* A save started from the progress callback of another save to the same
 * path: each writes its own temporary file, the outer one is published last
 * and intact, with the mode a plain create under the umask would give. */
typedef struct nested {
    const char *path;
    const ws_tensor *inner;
    int calls;
} nested;

static int on_progress_nested(uint64_t done, uint64_t total, void *ctx)
{
    (void)done;
    (void)total;
    nested *x = ctx;
    if (x->calls++ == 0) {
        const char *names[] = {"inner"};
        CHECK_OK(ws_st_write(x->path, 1, names, &x->inner, 0, NULL, 0, NULL, NULL));
    }
    return 0;
}

static void test_nested_save_same_path(void)
{
    const char *dir = case_dir("nested");
    char path[1024];
    snprintf(path, sizeof path, "%s/n.safetensors", dir);
    ws_tensor outer, inner;
    int64_t so[] = {4000}, si[] = {10};
    CHECK_OK(make(&outer, WS_U8, 1, so, 1));
    CHECK_OK(make(&inner, WS_U8, 1, si, 2));
    const ws_tensor *tp[] = {&outer};
    const char *names[] = {"outer"};
    nested x = {.path = path, .inner = &inner};
    CHECK_OK(ws_st_write(path, 1, names, tp, 0, NULL, 1000, on_progress_nested, &x));
    CHECK(x.calls >= 2);
    st_read r;
    CHECK(st_load(&r, path));
    uint64_t at = 0;
    if (r.header) {
        check_entry(&r, "outer", "U8", &outer, &at);
        CHECK(cJSON_GetArraySize(r.header) == 1);
        CHECK_EQ_U64(at, r.data_len);
    }
    st_unload(&r);
    CHECK(count_entries(dir, 0) == 1);
    mode_t mask = umask(022);
    umask(mask);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == (0666 & ~mask));
    ws_tensor_free(&outer);
    ws_tensor_free(&inner);
}

/* A stop asked for at the final progress call (the only one when there is
 * nothing to write) fails the save like any other: no file is published. */
static void test_stop_at_final_progress(void)
{
    const char *dir = case_dir("final_stop");
    char path[1024];
    snprintf(path, sizeof path, "%s/e.safetensors", dir);
    progress_log stop = {.monotonic = 1, .stop_at = 1};
    CHECK_ERR(ws_st_write(path, 0, NULL, NULL, 0, NULL, 0, on_progress, &stop),
              WS_ERR_INTERRUPTED, "stopped by the progress callback");
    CHECK(stop.calls == 1);
    CHECK(count_entries(dir, 0) == 0);
    stop = (progress_log){.monotonic = 1, .stop_at = 1};
    CHECK_ERR(ws_st_save_sharded(dir, NULL, 0, NULL, NULL, 0, 0, NULL, 0, on_progress, &stop,
                                 NULL),
              WS_ERR_INTERRUPTED, "stopped by the progress callback");
    CHECK(count_entries(dir, 0) == 0);
    ws_tensor t;
    int64_t s[] = {10};
    CHECK_OK(make(&t, WS_U8, 1, s, 1));
    const ws_tensor *tp[] = {&t};
    const char *names[] = {"t"};
    stop = (progress_log){.monotonic = 1, .stop_at = 1};
    CHECK_ERR(ws_st_save_sharded(dir, NULL, 1, names, tp, 0, 0, NULL, 0, on_progress, &stop,
                                 NULL),
              WS_ERR_INTERRUPTED, "stopped by the progress callback");
    CHECK(count_entries(dir, 0) == 0);
    ws_tensor_free(&t);
}

/* Names too long for the file system are misuse, found before anything is
 * written, never truncated into other names. */
static void test_long_names(void)
{
    const char *dir = case_dir("long");
    ws_tensor t;
    int64_t s[] = {10};
    CHECK_OK(make(&t, WS_U8, 1, s, 1));
    const ws_tensor *tp[] = {&t, &t};
    const char *names[] = {"a", "b"};
    static char prefix[5001];
    memset(prefix, 'p', 5000);
    CHECK_ERR(ws_st_save_sharded(dir, prefix, 1, names, tp, 0, 0, NULL, 0, NULL, NULL, NULL),
              WS_ERR_ARG, "too long");
    prefix[300] = '\0';
    CHECK_ERR(ws_st_save_sharded(dir, prefix, 1, names, tp, 0, 0, NULL, 0, NULL, NULL, NULL),
              WS_ERR_ARG, "too long");
    /* Short enough for one file but not for a shard or the index. */
    prefix[240] = '\0';
    CHECK_ERR(ws_st_save_sharded(dir, prefix, 2, names, tp, 10, 0, NULL, 0, NULL, NULL, NULL),
              WS_ERR_ARG, "-00001-of-00002.safetensors");
    CHECK(count_entries(dir, 0) == 0);
    /* The longest prefix that fits: files are written under their full names. */
    prefix[255 - strlen("-00001-of-00002.safetensors")] = '\0';
    CHECK_OK(ws_st_save_sharded(dir, prefix, 2, names, tp, 10, 0, NULL, 0, NULL, NULL, NULL));
    char file[300];
    ws_st_shard_filename(file, sizeof file, prefix, 1, 2);
    CHECK(exists(dir, file));
    CHECK(count_entries(dir, 0) == 3);
    /* A file name over the limit in a plain save. */
    char path[1024], base[301];
    memset(base, 'q', 300);
    base[300] = '\0';
    snprintf(path, sizeof path, "%s/%s", dir, base);
    CHECK_ERR(ws_st_write(path, 1, names, tp, 0, NULL, 0, NULL, NULL), WS_ERR_ARG, "too long");
    ws_tensor_free(&t);
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(root, sizeof root, "%s/ws-stw-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(test_every_dtype);
    RUN(test_no_metadata_and_empty);
    RUN(test_chunks_and_progress);
    RUN(test_misuse);
    RUN(test_io_errors);
    RUN(test_sharding);
    RUN(test_replaces_earlier_save);
    RUN(test_sharded_interrupted);
    RUN(test_device_tensors);
    RUN(test_tensor_gone_mid_save);
    RUN(test_nested_save_same_path);
    RUN(test_stop_at_final_progress);
    RUN(test_long_names);
    remove_tree(root);
    return check_summary();
}
