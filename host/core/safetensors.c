/* safetensors.c: parsing, validating and mapping one safetensors file.
 *
 * The header is checked whole before a file object exists, so no caller ever
 * sees an entry whose bytes are not all inside the data region. The parser
 * also serves a fuzz target: any input either parses or fails with one
 * message, and nothing leaks either way. The data region is used in place
 * (a read-only private mapping for ws_st_open), so a tensor costs no copy and
 * no page is read before a tensor's bytes are. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "fault.h"
#include "strmap.h"

struct ws_st_file {
    int refcount;
    char *label;
    void *map; /* ws_st_open's mapping, unmapped with the last reference */
    size_t map_size;
    int fd;    /* ws_st_open's file, for positioned reads; -1 for a parsed image */
    const unsigned char *data; /* the data region */
    size_t data_size;
    ws_st_entry *entries;
    size_t n;
    char *names; /* the entries' names, back to back */
    char **meta; /* key, value, key, value, ... */
    size_t n_meta;
    ws_strmap by_name;
};

/* ---- dtypes ------------------------------------------------------------------------- */

static const struct {
    const char *name;
    ws_dtype dtype;
} st_dtypes[] = {
    {"F32", WS_F32}, {"BF16", WS_BF16}, {"F16", WS_F16}, {"F8_E4M3", WS_FP8E4M3},
    {"U8", WS_U8},   {"I32", WS_I32},   {"I64", WS_I64},
};
#define N_ST_DTYPES (sizeof st_dtypes / sizeof st_dtypes[0])
#define ST_DTYPE_LIST "F32, BF16, F16, F8_E4M3, U8, I32, I64"

int ws_st_dtype_parse(const char *name, ws_dtype *out)
{
    for (size_t i = 0; i < N_ST_DTYPES; i++) {
        if (strcmp(name, st_dtypes[i].name) == 0) {
            *out = st_dtypes[i].dtype;
            return 0;
        }
    }
    return -1;
}

const char *ws_st_dtype_name(ws_dtype t)
{
    for (size_t i = 0; i < N_ST_DTYPES; i++)
        if (st_dtypes[i].dtype == t) return st_dtypes[i].name;
    return "?";
}

/* ---- the file object ---------------------------------------------------------------- */

static void st_free(ws_st_file *f)
{
    if (f->map) munmap(f->map, f->map_size);
    if (f->fd >= 0) close(f->fd);
    for (size_t i = 0; i < 2 * f->n_meta; i++) free(f->meta[i]);
    free(f->meta);
    ws_strmap_free(&f->by_name);
    free(f->names);
    free(f->entries);
    free(f->label);
    free(f);
}

void ws_st_retain(ws_st_file *f) { __atomic_add_fetch(&f->refcount, 1, __ATOMIC_RELAXED); }

void ws_st_unref(ws_st_file *f)
{
    if (f && __atomic_sub_fetch(&f->refcount, 1, __ATOMIC_ACQ_REL) == 0) st_free(f);
}

const char *ws_st_label(const ws_st_file *f) { return f->label; }
size_t ws_st_count(const ws_st_file *f) { return f->n; }

const ws_st_entry *ws_st_entry_at(const ws_st_file *f, size_t i)
{
    return i < f->n ? &f->entries[i] : NULL;
}

const ws_st_entry *ws_st_find(const ws_st_file *f, const char *name)
{
    size_t i;
    return ws_strmap_get(&f->by_name, name, &i) ? &f->entries[i] : NULL;
}

int ws_st_fd(const ws_st_file *f, uint64_t *data_offset)
{
    *data_offset = f->map ? (uint64_t)(f->data - (const unsigned char *)f->map) : 0;
    return f->fd;
}

const void *ws_st_data(const ws_st_file *f, size_t *size)
{
    *size = f->data_size;
    return f->data;
}

size_t ws_st_metadata_count(const ws_st_file *f) { return f->n_meta; }

const char *ws_st_metadata_key(const ws_st_file *f, size_t i)
{
    return i < f->n_meta ? f->meta[2 * i] : NULL;
}

const char *ws_st_metadata_value(const ws_st_file *f, size_t i)
{
    return i < f->n_meta ? f->meta[2 * i + 1] : NULL;
}

/* ---- validation --------------------------------------------------------------------- */

ws_status ws_st_bad(const char *kind, const char *label, const char *tensor, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (tensor)
        return WS_ERR(WS_ERR_FORMAT, "%s '%s': tensor '%s': %s", kind, label, tensor, what);
    return WS_ERR(WS_ERR_FORMAT, "%s '%s': %s", kind, label, what);
}

#define bad(label, tensor, ...) ws_st_bad("safetensors", (label), (tensor), __VA_ARGS__)

static const char *json_type(const cJSON *v)
{
    if (cJSON_IsObject(v)) return "an object";
    if (cJSON_IsArray(v)) return "a list";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNull(v)) return "null";
    return "invalid";
}

/* Integers up to 2^53: every one a double holds exactly. */
static int json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= 0.0) || d > 9007199254740992.0 || d != floor(d)) return 0;
    *out = (uint64_t)d;
    return 1;
}

/* Reads and checks one tensor entry against a data region of `data_size`. */
static ws_status parse_entry(const char *label, const char *name, const cJSON *v,
                             size_t data_size, ws_st_entry *e)
{
    if (!cJSON_IsObject(v))
        return bad(label, name, "the entry must be an object with dtype, shape and data_offsets, "
                   "got %s", json_type(v));
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(v, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(v, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(v, "data_offsets");
    if (!dt || !shape || !offs)
        return bad(label, name, "the entry lacks \"%s\"",
                   !dt ? "dtype" : !shape ? "shape" : "data_offsets");
    if (!cJSON_IsString(dt))
        return bad(label, name, "\"dtype\" must be a string, got %s", json_type(dt));
    if (ws_st_dtype_parse(dt->valuestring, &e->dtype) != 0)
        return bad(label, name, "dtype '%s' is not supported (supported: " ST_DTYPE_LIST ")",
                   dt->valuestring);

    if (!cJSON_IsArray(shape))
        return bad(label, name, "\"shape\" must be a list of non-negative integers, got %s",
                   json_type(shape));
    int nd = 0;
    const cJSON *d;
    cJSON_ArrayForEach(d, shape) {
        if (nd == WS_MAX_DIMS)
            return bad(label, name, "shape has %d dimensions; at most %d are supported",
                       cJSON_GetArraySize(shape), WS_MAX_DIMS);
        uint64_t size;
        if (!json_uint(d, &size))
            return bad(label, name, "shape[%d] must be a non-negative integer (at most 2^53)",
                       nd);
        e->shape[nd++] = (int64_t)size;
    }
    e->ndim = nd;
    /* As the tensor layer requires: the product of the non-zero dimensions
     * (the strides of even an empty tensor) stays addressable. */
    uint64_t reach = ws_dtype_size(e->dtype), nbytes;
    int empty = 0;
    for (int i = 0; i < nd; i++) {
        if (e->shape[i] == 0) {
            empty = 1;
            continue;
        }
        if (__builtin_mul_overflow(reach, (uint64_t)e->shape[i], &reach) ||
            reach > (uint64_t)INT64_MAX / 2)
            return bad(label, name, "shape is too large: its size in bytes overflows");
    }
    nbytes = empty ? 0 : reach;

    uint64_t b = 0, end = 0;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !json_uint(offs->child, &b) ||
        !json_uint(offs->child->next, &end))
        return bad(label, name, "\"data_offsets\" must be two non-negative integers [begin, end]");
    if (b > end)
        return bad(label, name, "data_offsets [%llu, %llu] end before they begin",
                   (unsigned long long)b, (unsigned long long)end);
    if (end > data_size)
        return bad(label, name, "data_offsets [%llu, %llu] reach past the data region (%zu bytes)",
                   (unsigned long long)b, (unsigned long long)end, data_size);
    if (end - b != nbytes) {
        ws_tensor tmp = {.dtype = e->dtype};
        ws_layout_contiguous(&tmp.layout, nd, e->shape);
        char ty[160];
        return bad(label, name, "data_offsets [%llu, %llu] span %llu bytes, but %s needs %llu",
                   (unsigned long long)b, (unsigned long long)end,
                   (unsigned long long)(end - b), ws_tensor_typestr(&tmp, ty, sizeof ty),
                   (unsigned long long)nbytes);
    }
    e->begin = (size_t)b;
    e->end = (size_t)end;
    return WS_OK;
}

static ws_status parse_metadata(ws_st_file *f, const cJSON *v)
{
    if (!cJSON_IsObject(v))
        return bad(f->label, NULL, "\"__metadata__\" must be an object of strings, got %s",
                   json_type(v));
    size_t n = (size_t)cJSON_GetArraySize(v);
    if (!n) return WS_OK;
    f->meta = ws_calloc(2 * n, sizeof *f->meta);
    if (!f->meta) return WS_ERR(WS_ERR_NOMEM, "safetensors '%s': out of memory", f->label);
    const cJSON *kv;
    cJSON_ArrayForEach(kv, v) {
        if (!cJSON_IsString(kv))
            return bad(f->label, NULL, "\"__metadata__\" must map strings to strings; '%s' is %s",
                       kv->string, json_type(kv));
        char **slot = &f->meta[2 * f->n_meta];
        slot[0] = ws_strdup(kv->string);
        slot[1] = ws_strdup(kv->valuestring);
        f->n_meta++; /* counted now, so st_free frees what was copied */
        if (!slot[0] || !slot[1])
            return WS_ERR(WS_ERR_NOMEM, "safetensors '%s': out of memory", f->label);
    }
    return WS_OK;
}

typedef struct span {
    size_t begin, end, entry;
} span;

static int span_cmp(const void *a, const void *b)
{
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Gaps between tensors are allowed (some writers align them); sharing bytes
 * is not: a write through one tensor would change the other. */
static ws_status check_overlaps(const ws_st_file *f)
{
    if (f->n < 2) return WS_OK;
    span *s = ws_malloc(f->n * sizeof *s);
    if (!s) return WS_ERR(WS_ERR_NOMEM, "safetensors '%s': out of memory", f->label);
    size_t m = 0;
    for (size_t i = 0; i < f->n; i++)
        if (f->entries[i].end > f->entries[i].begin) /* empty tensors overlap nothing */
            s[m++] = (span){f->entries[i].begin, f->entries[i].end, i};
    qsort(s, m, sizeof *s, span_cmp);
    ws_status rc = WS_OK;
    size_t reach = 0, last = 0; /* furthest end so far, and its entry */
    for (size_t i = 0; i < m && rc == WS_OK; i++) {
        if (i > 0 && s[i].begin < reach) {
            const ws_st_entry *a = &f->entries[last], *b = &f->entries[s[i].entry];
            rc = bad(f->label, b->name, "its bytes [%zu, %zu) overlap those of tensor '%s' "
                     "[%zu, %zu)", b->begin, b->end, a->name, a->begin, a->end);
        }
        if (s[i].end > reach) {
            reach = s[i].end;
            last = s[i].entry;
        }
    }
    free(s);
    return rc;
}

/* Fills f from the parsed header `root` (an object). */
static ws_status parse_header(ws_st_file *f, const cJSON *root)
{
    size_t count = 0, names_len = 0, n_metadata = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, root) {
        count++;
        names_len += strlen(v->string) + 1;
        n_metadata += strcmp(v->string, "__metadata__") == 0;
    }
    if (n_metadata > 1) return bad(f->label, NULL, "\"__metadata__\" appears twice");
    f->entries = ws_calloc(count ? count : 1, sizeof *f->entries);
    f->names = ws_malloc(names_len ? names_len : 1);
    if (!f->entries || !f->names)
        return WS_ERR(WS_ERR_NOMEM, "safetensors '%s': out of memory for %zu tensors", f->label,
                      count);
    WS_TRY(ws_strmap_init(&f->by_name, count));
    char *next = f->names;
    cJSON_ArrayForEach(v, root) {
        if (strcmp(v->string, "__metadata__") == 0) {
            WS_TRY(parse_metadata(f, v));
            continue;
        }
        ws_st_entry *e = &f->entries[f->n];
        size_t len = strlen(v->string) + 1;
        memcpy(next, v->string, len);
        e->name = next;
        next += len;
        WS_TRY(parse_entry(f->label, e->name, v, f->data_size, e));
        if (!ws_strmap_put(&f->by_name, e->name, f->n, NULL))
            return bad(f->label, e->name, "the name appears twice in the header");
        f->n++;
    }
    return check_overlaps(f);
}

ws_status ws_st_parse(const void *data, size_t size, const char *label, ws_st_file **out)
{
    *out = NULL;
    if (!label) label = "(memory)";
    if (size < 8)
        return bad(label, NULL, "the file is %zu bytes, shorter than the 8-byte header length; "
                   "is it a safetensors file?", size);
    if (!data) return WS_ERR(WS_ERR_ARG, "safetensors '%s': no data for %zu bytes", label, size);
    const unsigned char *p = data;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | p[i];
    if (hlen > WS_ST_MAX_HEADER_BYTES)
        return bad(label, NULL, "header length %llu is above the limit of %llu bytes; is it a "
                   "safetensors file?", (unsigned long long)hlen,
                   (unsigned long long)WS_ST_MAX_HEADER_BYTES);
    if (hlen > size - 8)
        return bad(label, NULL, "header length %llu goes past the end of the file (%zu bytes); "
                   "is the file truncated?", (unsigned long long)hlen, size);

    const char *text = (const char *)p + 8, *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, (size_t)hlen, &end, 0);
    if (!root) {
        size_t at = end && end >= text && end <= text + hlen ? (size_t)(end - text) : 0;
        return bad(label, NULL, "the header is not valid JSON (at byte %zu of %llu)", at,
                   (unsigned long long)hlen);
    }
    /* Writers pad the header with spaces to align the data; anything else
     * after the JSON value means the header is not what it says. */
    for (const char *q = end; q < text + hlen; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            cJSON_Delete(root);
            return bad(label, NULL, "the header has bytes after its JSON value (at byte %zu of "
                       "%llu)", (size_t)(q - text), (unsigned long long)hlen);
        }
    }
    if (!cJSON_IsObject(root)) {
        ws_status rc = bad(label, NULL, "the header must be a JSON object, got %s",
                           json_type(root));
        cJSON_Delete(root);
        return rc;
    }

    ws_st_file *f = ws_calloc(1, sizeof *f);
    char *copy = ws_strdup(label);
    if (!f || !copy) {
        free(f);
        free(copy);
        cJSON_Delete(root);
        return WS_ERR(WS_ERR_NOMEM, "safetensors '%s': out of memory", label);
    }
    f->refcount = 1;
    f->fd = -1;
    f->label = copy;
    f->data = p + 8 + hlen;
    f->data_size = size - 8 - (size_t)hlen;
    ws_status rc = parse_header(f, root);
    cJSON_Delete(root);
    if (rc != WS_OK) {
        st_free(f);
        return rc;
    }
    *out = f;
    return WS_OK;
}

ws_status ws_st_open(const char *path, ws_st_file **out)
{
    *out = NULL;
    /* O_NONBLOCK: opening a FIFO must not hang; it is refused below. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return WS_ERR(WS_ERR_IO, "safetensors '%s': cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return WS_ERR(WS_ERR_IO, "safetensors '%s': cannot stat: %s", path, strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return WS_ERR(WS_ERR_IO, "safetensors '%s': not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    void *map = NULL;
    if (size >= 8) { /* shorter files fail the parse without being read */
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int err = errno;
            close(fd);
            return WS_ERR(err == ENOMEM ? WS_ERR_NOMEM : WS_ERR_IO,
                          "safetensors '%s': cannot map %zu bytes: %s", path, size, strerror(err));
        }
    }
    ws_status rc = ws_st_parse(map, size, path, out);
    if (rc != WS_OK) {
        if (map) munmap(map, size);
        close(fd);
        return rc;
    }
    (*out)->map = map;
    (*out)->map_size = size;
    (*out)->fd = fd; /* kept for ws_st_fd's positioned reads */
    return WS_OK;
}

/* ---- tensors ------------------------------------------------------------------------ */

static void release_file(void *ctx) { ws_st_unref(ctx); }

ws_status ws_st_tensor(ws_st_file *f, const ws_st_entry *e, ws_tensor *out)
{
    memset(out, 0, sizeof *out);
    if (!f || !e || e < f->entries || e >= f->entries + f->n)
        return WS_ERR(WS_ERR_ARG, "safetensors '%s': the entry is not one of this file's",
                      f ? f->label : "(none)");
    ws_external mem = {
        .data = (void *)(f->data + e->begin),
        .nbytes = e->end - e->begin,
        .read_only = 1,
        .source = f->label,
        .release = release_file,
        .release_ctx = f,
    };
    ws_st_retain(f);
    ws_status rc = ws_tensor_external(out, &mem, e->dtype, e->ndim, e->shape, e->name);
    if (rc != WS_OK) ws_st_unref(f);
    return rc;
}
