/* fuzz_safetensors.c: libFuzzer targets for the safetensors header parser and
 * the checkpoint index parser (host/core/safetensors.h).
 *
 * Built twice (tests/fuzz/CMakeLists.txt): fuzz_safetensors hands each input
 * to ws_st_parse as a whole file image, fuzz_safetensors_index (compiled with
 * WS_FUZZ_INDEX) to ws_st_index_parse as index text. Beyond what ASan and
 * UBSan catch, a target aborts when the parser breaks its own contract: a
 * failure is WS_ERR_FORMAT (or WS_ERR_NOMEM) with a message and no object;
 * a success hands out entries whose bytes lie inside the data region, whose
 * names find themselves, and whose tensors keep the file alive. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "safetensors.h"
#include "status.h"
#include "tensor.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REQUIRE(cond, ...)                                                                 \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_safetensors: %s:%d: contract broken: %s: ", __FILE__,     \
                    __LINE__, #cond);                                                      \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fputc('\n', stderr);                                                           \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

/* A failed parse: the documented codes, a message, nothing handed out. */
static void check_failure(ws_status rc, const void *out)
{
    REQUIRE(rc == WS_ERR_FORMAT || rc == WS_ERR_NOMEM, "status %s: %s", ws_status_name(rc),
            ws_errmsg());
    REQUIRE(out == NULL, "an object came back with status %s", ws_status_name(rc));
    REQUIRE(ws_errmsg() && ws_errmsg()[0], "status %s without a message", ws_status_name(rc));
}

#ifndef WS_FUZZ_INDEX

/* Reads every byte of t, so ASan sees any byte outside the input. */
static unsigned read_all(const ws_tensor *t, size_t nbytes)
{
    void *p = NULL;
    ws_status rc = ws_tensor_access(t, WS_ACCESS_READ, "fuzz read", &p);
    REQUIRE(rc == WS_OK, "reading a parsed tensor: %s", ws_errmsg());
    const volatile unsigned char *b = p;
    unsigned sum = 0;
    for (size_t i = 0; i < nbytes; i++) sum += b[i];
    return sum;
}

static void check_file(ws_st_file *f)
{
    size_t data_size = 0;
    const unsigned char *region = ws_st_data(f, &data_size);
    size_t n = ws_st_count(f);
    for (size_t i = 0; i < n; i++) {
        const ws_st_entry *e = ws_st_entry_at(f, i);
        REQUIRE(e && e->name, "entry %zu of %zu missing", i, n);
        REQUIRE(ws_st_find(f, e->name) == e, "'%s' does not find itself", e->name);
        REQUIRE(e->begin <= e->end && e->end <= data_size, "'%s' [%zu, %zu) outside %zu bytes",
                e->name, e->begin, e->end, data_size);
        REQUIRE(e->ndim >= 0 && e->ndim <= WS_MAX_DIMS, "'%s' has %d dims", e->name, e->ndim);
        uint64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) numel *= (uint64_t)e->shape[d];
        REQUIRE(numel * ws_dtype_size(e->dtype) == e->end - e->begin,
                "'%s': %llu elements in %zu bytes", e->name, (unsigned long long)numel,
                e->end - e->begin);
        ws_tensor t;
        ws_status rc = ws_st_tensor(f, e, &t);
        if (rc == WS_ERR_NOMEM) continue;
        REQUIRE(rc == WS_OK, "tensor of '%s': %s", e->name, ws_errmsg());
        void *p = NULL;
        REQUIRE(ws_tensor_access(&t, WS_ACCESS_WRITE, "fuzz write", &p) != WS_OK,
                "'%s' is writable", e->name);
        if (e->end > e->begin) {
            REQUIRE(ws_tensor_access(&t, WS_ACCESS_READ, "fuzz read", &p) == WS_OK &&
                    (const unsigned char *)p == region + e->begin,
                    "'%s' is not a view of its bytes", e->name);
        }
        read_all(&t, e->end - e->begin);
        ws_tensor_free(&t);
    }
    for (size_t i = 0; i < ws_st_metadata_count(f); i++) {
        const char *k = ws_st_metadata_key(f, i), *v = ws_st_metadata_value(f, i);
        REQUIRE(k && v, "metadata %zu missing", i);
        (void)strlen(k);
        (void)strlen(v);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ws_st_file *f = NULL;
    ws_status rc = ws_st_parse(data, size, "fuzz.safetensors", &f);
    if (rc != WS_OK) {
        check_failure(rc, f);
        return 0;
    }
    REQUIRE(f != NULL, "WS_OK without a file");
    check_file(f);
    /* The last tensor outlives the opener's reference and still reads. */
    size_t n = ws_st_count(f);
    ws_tensor last;
    int have = n > 0 && ws_st_tensor(f, ws_st_entry_at(f, n - 1), &last) == WS_OK;
    ws_st_unref(f);
    if (have) {
        size_t nbytes = ws_dtype_size(last.dtype);
        for (int d = 0; d < last.layout.ndim; d++) nbytes *= (size_t)last.layout.shape[d];
        read_all(&last, nbytes);
        ws_tensor_free(&last);
    }
    return 0;
}

#else /* WS_FUZZ_INDEX */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ws_st_index *x = NULL;
    ws_status rc = ws_st_index_parse((const char *)data, size, "fuzz.index.json", &x);
    if (rc != WS_OK) {
        check_failure(rc, x);
        return 0;
    }
    REQUIRE(x != NULL, "WS_OK without an index");
    size_t n = ws_st_index_count(x), files = ws_st_index_file_count(x);
    REQUIRE(files <= n && (files > 0 || n == 0), "%zu files for %zu tensors", files, n);
    for (size_t i = 0; i < n; i++) {
        const char *name = ws_st_index_name(x, i);
        size_t at = SIZE_MAX;
        REQUIRE(name, "tensor %zu has no name", i);
        REQUIRE(ws_st_index_find(x, name, &at) && at == i, "'%s' found at %zu, not %zu", name,
                at, i);
        REQUIRE(ws_st_index_file_of(x, i) < files, "'%s' in file %zu of %zu", name,
                ws_st_index_file_of(x, i), files);
    }
    for (size_t j = 0; j < files; j++) {
        const char *file = ws_st_index_file(x, j);
        REQUIRE(file && file[0] && !strchr(file, '/') && strcmp(file, "..") != 0,
                "shard file '%s' is not a plain name", file ? file : "(null)");
    }
    for (size_t i = 0; i < ws_st_index_metadata_count(x); i++) {
        const char *k = ws_st_index_metadata_key(x, i), *v = ws_st_index_metadata_value(x, i);
        REQUIRE(k && v, "metadata %zu missing", i);
        (void)strlen(k);
        (void)strlen(v);
    }
    ws_st_index_free(x);
    return 0;
}

#endif
