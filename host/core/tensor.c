/* tensor.c: tensors, views, shared storage and the per-tensor data ops.
 *
 * A storage is one allocation with a reference count; tensors and views hold
 * references. Storage carved from a pool remembers which byte ranges hold
 * data written since the pool last discarded them, so a read of discarded
 * contents fails with a message naming the tensor, the pool and the sleep.
 * Every data op checks its arguments first (freed, discarded, asleep, shape)
 * and names the tensor and the argument in the error. Copies between devices
 * only ever move raw bytes across the link; dtype conversion and strided
 * gathers run on one device (the GPU one when there is one). */
#include "tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"
#include "pool.h"

/* ---- storage ---------------------------------------------------------------------- */

/* Where empty tensors point: never read or written (0 bytes), but not NULL,
 * so memcmp/memcpy of zero bytes on their data stay well defined. */
static _Alignas(256) unsigned char empty_data[256];

void ws_storage_retain(ws_storage *s) { __atomic_add_fetch(&s->refcount, 1, __ATOMIC_RELAXED); }

void ws_storage_release(ws_storage *s)
{
    if (!s || __atomic_sub_fetch(&s->refcount, 1, __ATOMIC_ACQ_REL) != 0) return;
    switch (s->kind) {
    case WS_STORAGE_DEVICE:
        if (s->nbytes) s->owner->ops->free(s->owner, s->data, s->nbytes);
        break;
    case WS_STORAGE_HOST_PINNED:
        if (s->nbytes) s->owner->ops->host_free(s->owner, s->data, s->nbytes);
        break;
    case WS_STORAGE_POOL:
        ws_pool_unregister_storage(s->pool, s);
        ws_pool_uncarve(s->pool, s->pool_offset, s->nbytes);
        break;
    case WS_STORAGE_EXTERNAL:
        if (s->release) s->release(s->release_ctx);
        break;
    }
    free(s->written);
    free(s->name);
    free(s->source);
    free(s);
}

/* ---- names and labels ------------------------------------------------------------- */

const char *ws_tensor_typestr(const ws_tensor *t, char *buf, size_t n)
{
    size_t k = (size_t)snprintf(buf, n, "%s[", ws_dtype_name(t->dtype));
    for (int i = 0; i < t->layout.ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? "," : "",
                              (long long)t->layout.shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

const char *ws_tensor_label(const ws_tensor *t, char *buf, size_t n)
{
    if (t->name) {
        snprintf(buf, n, "'%s'", t->name);
    } else if (!t->storage) {
        snprintf(buf, n, "<unnamed>");
    } else {
        char ty[160];
        snprintf(buf, n, "<unnamed %s>", ws_tensor_typestr(t, ty, sizeof ty));
    }
    return buf;
}

ws_status ws_tensor_set_name(ws_tensor *t, const char *name)
{
    char *copy = NULL;
    if (name && !(copy = ws_strdup(name)))
        return WS_ERR(WS_ERR_NOMEM, "out of memory naming a tensor '%s'", name);
    free(t->name);
    t->name = copy;
    return WS_OK;
}

/* ---- allocation and release ----------------------------------------------------------- */

static ws_status check_shape(int ndim, const int64_t *shape, ws_dtype dtype, size_t *nbytes)
{
    if ((unsigned)dtype >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "unknown dtype %d", (int)dtype);
    if (ndim < 0 || ndim > WS_MAX_DIMS)
        return WS_ERR(WS_ERR_ARG, "a tensor has 0 to %d dimensions, got %d", WS_MAX_DIMS, ndim);
    /* `reach` skips 0-sized dimensions: an empty tensor still needs strides
     * (products of the later dimensions) and a numel that do not overflow. */
    size_t n = ws_dtype_size(dtype), reach = n;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return WS_ERR(WS_ERR_ARG, "dimension %d has negative size %lld", i,
                          (long long)shape[i]);
        if (shape[i] == 0) {
            n = 0;
            continue;
        }
        if (reach > SIZE_MAX / (size_t)shape[i] / 2)
            return WS_ERR(WS_ERR_NOMEM, "tensor of this shape is too large to address");
        reach *= (size_t)shape[i];
        n *= (size_t)shape[i];
    }
    *nbytes = n;
    return WS_OK;
}

ws_status ws_tensor_empty(ws_tensor *t, ws_dtype dtype, int ndim, const int64_t *shape,
                          const ws_tensor_opts *opts)
{
    static const ws_tensor_opts no_opts;
    if (!opts) opts = &no_opts;
    memset(t, 0, sizeof *t);
    size_t nbytes = 0;
    ws_status rc = check_shape(ndim, shape, dtype, &nbytes);
    if (rc != WS_OK) {
        ws_errprefix("creating tensor '%s'", opts->name ? opts->name : "(unnamed)");
        return rc;
    }
    ws_storage *s = ws_calloc(1, sizeof *s);
    char *name = opts->name ? ws_strdup(opts->name) : NULL;
    char *sname = opts->name ? ws_strdup(opts->name) : NULL;
    if (!s || (opts->name && (!name || !sname))) {
        free(s);
        free(name);
        free(sname);
        return WS_ERR(WS_ERR_NOMEM, "out of memory creating tensor '%s'",
                      opts->name ? opts->name : "(unnamed)");
    }
    s->refcount = 1;
    s->nbytes = nbytes;
    s->name = sname;
    s->data = empty_data; /* replaced below unless the tensor is empty */
    if (opts->pool) {
        s->kind = WS_STORAGE_POOL;
        s->device = s->owner = ws_pool_device(opts->pool);
        s->pool = opts->pool;
        if (nbytes) {
            rc = ws_pool_carve(opts->pool, nbytes, &s->pool_offset, &s->data);
            if (rc == WS_OK) {
                /* Fresh pool memory counts as written: only a discard makes
                 * contents unreadable, as with any new allocation. */
                s->written = ws_malloc(sizeof *s->written);
                if (s->written) {
                    s->written[0] = (ws_range){0, nbytes};
                    s->n_written = s->cap_written = 1;
                } else {
                    ws_pool_uncarve(opts->pool, s->pool_offset, nbytes);
                    rc = WS_ERR(WS_ERR_NOMEM, "out of memory tracking a pool tensor");
                }
            }
        }
        if (rc == WS_OK) ws_pool_register_storage(opts->pool, s);
    } else if (opts->pinned) {
        s->kind = WS_STORAGE_HOST_PINNED;
        s->device = ws_device_cpu();
        s->owner = opts->pin_device ? opts->pin_device : s->device;
        if (nbytes) rc = s->owner->ops->host_alloc(s->owner, nbytes, &s->data);
    } else {
        s->kind = WS_STORAGE_DEVICE;
        s->device = s->owner = opts->device ? opts->device : ws_device_cpu();
        if (nbytes) rc = s->owner->ops->alloc(s->owner, nbytes, &s->data);
    }
    if (rc != WS_OK) {
        char ty[160];
        ws_tensor tmp = {.dtype = dtype};
        ws_layout_contiguous(&tmp.layout, ndim, shape);
        ws_errprefix("creating tensor '%s' %s", opts->name ? opts->name : "(unnamed)",
                     ws_tensor_typestr(&tmp, ty, sizeof ty)); /* the device names itself */
        free(s->written);
        free(s);
        free(name);
        free(sname);
        return rc;
    }
    t->storage = s;
    t->offset = 0;
    t->dtype = dtype;
    ws_layout_contiguous(&t->layout, ndim, shape);
    t->name = name;
    return WS_OK;
}

ws_status ws_tensor_external(ws_tensor *t, const ws_external *mem, ws_dtype dtype, int ndim,
                             const int64_t *shape, const char *name)
{
    memset(t, 0, sizeof *t);
    const char *label = name ? name : "(unnamed)";
    size_t nbytes = 0;
    ws_status rc = check_shape(ndim, shape, dtype, &nbytes);
    if (rc != WS_OK) {
        ws_errprefix("creating tensor '%s' over external memory", label);
        return rc;
    }
    if (nbytes > mem->nbytes || (nbytes && !mem->data)) {
        char ty[160], have[32];
        ws_tensor tmp = {.dtype = dtype};
        ws_layout_contiguous(&tmp.layout, ndim, shape);
        return WS_ERR(WS_ERR_ARG, "creating tensor '%s' %s over external memory: it needs %zu "
                      "bytes, the memory%s%s%s holds %s", label,
                      ws_tensor_typestr(&tmp, ty, sizeof ty), nbytes,
                      mem->source ? " from '" : "", mem->source ? mem->source : "",
                      mem->source ? "'" : "", ws_format_bytes(have, sizeof have, mem->nbytes));
    }
    ws_storage *s = ws_calloc(1, sizeof *s);
    char *tname = name ? ws_strdup(name) : NULL;
    char *sname = name ? ws_strdup(name) : NULL;
    char *source = mem->source ? ws_strdup(mem->source) : NULL;
    if (!s || (name && (!tname || !sname)) || (mem->source && !source)) {
        free(s);
        free(tname);
        free(sname);
        free(source);
        return WS_ERR(WS_ERR_NOMEM, "out of memory creating tensor '%s' over external memory",
                      label);
    }
    s->refcount = 1;
    s->kind = WS_STORAGE_EXTERNAL;
    s->device = s->owner = mem->device ? mem->device : ws_device_cpu();
    s->data = mem->data ? mem->data : empty_data;
    s->nbytes = mem->nbytes;
    s->name = sname;
    s->release = mem->release;
    s->release_ctx = mem->release_ctx;
    s->read_only = mem->read_only;
    s->source = source;
    t->storage = s;
    t->dtype = dtype;
    ws_layout_contiguous(&t->layout, ndim, shape);
    t->name = tname;
    return WS_OK;
}

int ws_tensor_is_read_only(const ws_tensor *t) { return t->storage && t->storage->read_only; }

void ws_tensor_release(ws_tensor *t)
{
    if (!t->storage) return;
    ws_storage *s = t->storage;
    char *name = t->name;
    memset(t, 0, sizeof *t);
    t->name = name;
    ws_storage_release(s);
}

void ws_tensor_free(ws_tensor *t)
{
    ws_tensor_release(t);
    free(t->name);
    memset(t, 0, sizeof *t);
}

int ws_tensor_is_released(const ws_tensor *t) { return t->storage == NULL; }

int64_t ws_tensor_numel(const ws_tensor *t) { return ws_layout_numel(&t->layout); }

size_t ws_tensor_nbytes(const ws_tensor *t)
{
    return (size_t)ws_tensor_numel(t) * ws_dtype_size(t->dtype);
}

int ws_tensor_is_contiguous(const ws_tensor *t) { return ws_layout_is_contiguous(&t->layout); }

int ws_tensor_same_shape(const ws_tensor *a, const ws_tensor *b)
{
    if (a->layout.ndim != b->layout.ndim) return 0;
    for (int i = 0; i < a->layout.ndim; i++)
        if (a->layout.shape[i] != b->layout.shape[i]) return 0;
    return 1;
}

void ws_tensor_byte_span(const ws_tensor *t, size_t *begin, size_t *end)
{
    if (ws_tensor_numel(t) == 0) {
        *begin = *end = t->offset;
        return;
    }
    int64_t lo = 0, hi = 0;
    for (int i = 0; i < t->layout.ndim; i++) {
        int64_t reach = (t->layout.shape[i] - 1) * t->layout.strides[i];
        if (reach < 0) lo += reach;
        else hi += reach;
    }
    int64_t es = (int64_t)ws_dtype_size(t->dtype);
    *begin = (size_t)((int64_t)t->offset + lo * es);
    *end = (size_t)((int64_t)t->offset + hi * es + es);
}

/* ---- validity ----------------------------------------------------------------------- */

ws_status ws_tensor_check_live(const ws_tensor *t, const char *what)
{
    char lb[200];
    if (!t) return WS_ERR(WS_ERR_ARG, "%s: tensor is missing (NULL)", what ? what : "tensor");
    if (!t->storage)
        return WS_ERR(WS_ERR_FREED, "%s: tensor %s was freed; create it again",
                      what ? what : "tensor", ws_tensor_label(t, lb, sizeof lb));
    return WS_OK;
}

static ws_status check_awake(const ws_tensor *t, const char *what, const char *verb)
{
    ws_pool *p = t->storage->pool;
    if (t->storage->kind != WS_STORAGE_POOL || !p || !ws_pool_is_asleep(p)) return WS_OK;
    char lb[200];
    return WS_ERR(WS_ERR_DISCARDED,
                  "%s: tensor %s in pool '%s' cannot be %s: the pool is asleep; wake it "
                  "(pool:wake()) first",
                  what ? what : "tensor", ws_tensor_label(t, lb, sizeof lb), ws_pool_tag(p), verb);
}

/* The bytes a strided view really touches, as `count` runs of `len` bytes
 * (its innermost contiguous block, repeated over the outer dimensions), so
 * that writing one column of a matrix does not count the other columns as
 * written. Views with too many runs to track one by one, or with outer
 * strides that are not positive, fall back to their whole span. */
#define MAX_TRACKED_RUNS 4096

typedef struct view_runs {
    int outer;  /* dimensions [0, outer) enumerate the runs */
    size_t len; /* bytes per run */
    size_t count;
    int64_t idx[WS_MAX_DIMS];
    size_t next; /* runs handed out so far */
} view_runs;

/* Returns 0 when the view is better treated as its whole span. */
static int runs_init(const ws_tensor *t, view_runs *r)
{
    const ws_layout *l = &t->layout;
    int64_t inner = 1;
    int d = l->ndim - 1;
    for (; d >= 0; d--) {
        if (l->shape[d] == 1) continue;
        if (l->strides[d] != inner) break;
        inner *= l->shape[d];
    }
    int64_t numel = ws_tensor_numel(t);
    if (numel == 0 || numel / inner <= 1 || numel / inner > MAX_TRACKED_RUNS) return 0;
    for (int i = 0; i <= d; i++)
        if (l->shape[i] > 1 && l->strides[i] <= 0) return 0;
    memset(r, 0, sizeof *r);
    r->outer = d + 1;
    r->len = (size_t)inner * ws_dtype_size(t->dtype);
    r->count = (size_t)(numel / inner);
    return 1;
}

/* Storage byte offset of the next run; 0 when all were handed out. */
static int runs_next(const ws_tensor *t, view_runs *r, size_t *begin)
{
    if (r->next == r->count) return 0;
    const ws_layout *l = &t->layout;
    int64_t off = 0;
    for (int i = 0; i < r->outer; i++) off += r->idx[i] * l->strides[i];
    *begin = t->offset + (size_t)off * ws_dtype_size(t->dtype);
    for (int i = r->outer - 1; i >= 0; i--) {
        if (++r->idx[i] < l->shape[i]) break;
        r->idx[i] = 0;
    }
    r->next++;
    return 1;
}

/* Whether one written range covers [b, e). Ranges are sorted and merged. */
static int covered(const ws_storage *s, size_t b, size_t e)
{
    size_t lo = 0, hi = s->n_written;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (s->written[mid].end <= b) lo = mid + 1;
        else hi = mid;
    }
    return lo < s->n_written && s->written[lo].begin <= b && s->written[lo].end >= e;
}

ws_status ws_tensor_check_readable(const ws_tensor *t, const char *what)
{
    WS_TRY(ws_tensor_check_live(t, what));
    const ws_storage *s = t->storage;
    if (s->kind != WS_STORAGE_POOL) return WS_OK;
    WS_TRY(check_awake(t, what, "read"));
    size_t b, e;
    ws_tensor_byte_span(t, &b, &e);
    if (b == e) return WS_OK;
    view_runs r;
    int ok = 1;
    if (runs_init(t, &r)) {
        while (ok && runs_next(t, &r, &b)) ok = covered(s, b, b + r.len);
    } else {
        ok = covered(s, b, e);
    }
    if (ok) return WS_OK;
    char lb[200];
    const char *reason = ws_pool_discard_reason(s->pool);
    return WS_ERR(WS_ERR_DISCARDED,
                  "%s: tensor %s in pool '%s': contents were discarded by %s and have not been "
                  "written since; write them (send the base weights) before reading",
                  what ? what : "tensor", ws_tensor_label(t, lb, sizeof lb), ws_pool_tag(s->pool),
                  reason ? reason : "a pool sleep");
}

ws_status ws_tensor_check_writable(const ws_tensor *t, const char *what)
{
    WS_TRY(ws_tensor_check_live(t, what));
    if (t->storage->read_only) {
        char lb[200];
        return WS_ERR(WS_ERR_ARG,
                      "%s: tensor %s is read-only (mapped from '%s'); copy it into a tensor of "
                      "its own to change it",
                      what ? what : "tensor", ws_tensor_label(t, lb, sizeof lb),
                      t->storage->source ? t->storage->source : "external memory");
    }
    return check_awake(t, what, "written");
}

ws_status ws_tensor_access(const ws_tensor *t, int access, const char *what, void **ptr)
{
    *ptr = NULL;
    if (!(access & (WS_ACCESS_READ | WS_ACCESS_WRITE)))
        return WS_ERR(WS_ERR_ARG, "%s: no access asked for", what ? what : "tensor");
    if (access & WS_ACCESS_READ) WS_TRY(ws_tensor_check_readable(t, what));
    if (access & WS_ACCESS_WRITE) WS_TRY(ws_tensor_check_writable(t, what));
    *ptr = (char *)t->storage->data + t->offset;
    return WS_OK;
}

static void mark_span(ws_storage *s, size_t b, size_t e)
{
    if (s->kind != WS_STORAGE_POOL || b >= e) return;
    /* First range that ends at or after b (touching ranges merge). */
    size_t i = 0, hi = s->n_written;
    while (i < hi) {
        size_t mid = (i + hi) / 2;
        if (s->written[mid].end < b) i = mid + 1;
        else hi = mid;
    }
    size_t j = i; /* one past the last range that begins at or before e */
    while (j < s->n_written && s->written[j].begin <= e) j++;
    if (j > i) {
        /* Merge [i, j) with the new span into slot i. */
        if (s->written[i].begin < b) b = s->written[i].begin;
        if (s->written[j - 1].end > e) e = s->written[j - 1].end;
        s->written[i] = (ws_range){b, e};
        memmove(&s->written[i + 1], &s->written[j], (s->n_written - j) * sizeof *s->written);
        s->n_written -= j - i - 1;
        return;
    }
    if (s->n_written == s->cap_written) {
        size_t cap = s->cap_written ? 2 * s->cap_written : 4;
        ws_range *grown = realloc(s->written, cap * sizeof *grown);
        if (!grown) {
            /* Cannot record a new range: widen a neighbour instead. This
             * may accept a later read of discarded bytes but never rejects
             * valid data, and it needs no memory. */
            if (s->n_written == 0) return;
            size_t k = i < s->n_written ? i : i - 1;
            if (s->written[k].begin > b) s->written[k].begin = b;
            if (s->written[k].end < e) s->written[k].end = e;
            return;
        }
        s->written = grown;
        s->cap_written = cap;
    }
    memmove(&s->written[i + 1], &s->written[i], (s->n_written - i) * sizeof *s->written);
    s->written[i] = (ws_range){b, e};
    s->n_written++;
}

void ws_tensor_mark_written(const ws_tensor *t)
{
    if (!t->storage || t->storage->kind != WS_STORAGE_POOL) return;
    view_runs r;
    size_t b, e;
    if (runs_init(t, &r)) {
        while (runs_next(t, &r, &b)) mark_span(t->storage, b, b + r.len);
        return;
    }
    ws_tensor_byte_span(t, &b, &e);
    mark_span(t->storage, b, e);
}

/* ---- views ------------------------------------------------------------------------- */

/* Fills `out` as a view of t's storage with a new layout; takes a reference. */
static ws_status make_view(ws_tensor *out, const ws_tensor *t, size_t offset, ws_dtype dtype,
                           const ws_layout *l)
{
    char *name = NULL;
    if (t->name && !(name = ws_strdup(t->name)))
        return WS_ERR(WS_ERR_NOMEM, "out of memory creating a view of '%s'", t->name);
    ws_storage_retain(t->storage);
    ws_tensor v = {t->storage, offset, dtype, *l, name};
    *out = v;
    return WS_OK;
}

ws_status ws_tensor_narrow(ws_tensor *out, const ws_tensor *t, int dim, int64_t start,
                           int64_t length)
{
    WS_TRY(ws_tensor_check_live(t, "narrow"));
    char lb[200], ty[160];
    if (dim < 0 || dim >= t->layout.ndim)
        return WS_ERR(WS_ERR_ARG, "narrow: dimension %d out of range for tensor %s %s", dim,
                      ws_tensor_label(t, lb, sizeof lb), ws_tensor_typestr(t, ty, sizeof ty));
    int64_t size = t->layout.shape[dim];
    if (start < 0 || length < 0 || start > size || length > size - start)
        return WS_ERR(WS_ERR_ARG,
                      "narrow: range [%lld, %lld) of dimension %d is out of bounds for tensor %s "
                      "%s (size %lld)",
                      (long long)start, (long long)(start + length), dim,
                      ws_tensor_label(t, lb, sizeof lb), ws_tensor_typestr(t, ty, sizeof ty),
                      (long long)size);
    ws_layout l = t->layout;
    l.shape[dim] = length;
    size_t off = t->offset + (size_t)(start * t->layout.strides[dim]) * ws_dtype_size(t->dtype);
    return make_view(out, t, off, t->dtype, &l);
}

ws_status ws_tensor_reshape(ws_tensor *out, const ws_tensor *t, int ndim, const int64_t *shape)
{
    WS_TRY(ws_tensor_check_live(t, "reshape"));
    char lb[200], ty[160];
    if (ndim < 0 || ndim > WS_MAX_DIMS)
        return WS_ERR(WS_ERR_ARG, "reshape: %d dimensions requested for tensor %s; at most %d",
                      ndim, ws_tensor_label(t, lb, sizeof lb), WS_MAX_DIMS);
    if (!ws_tensor_is_contiguous(t))
        return WS_ERR(WS_ERR_ARG, "reshape: tensor %s %s is not contiguous; copy it first",
                      ws_tensor_label(t, lb, sizeof lb), ws_tensor_typestr(t, ty, sizeof ty));
    int64_t numel = ws_tensor_numel(t), known = 1, nonzero = 1;
    int infer = -1;
    int64_t dims[WS_MAX_DIMS];
    for (int i = 0; i < ndim; i++) {
        dims[i] = shape[i];
        if (shape[i] == -1 && infer < 0) {
            infer = i;
            continue;
        }
        if (shape[i] < 0)
            return WS_ERR(WS_ERR_ARG, "reshape: invalid size %lld for dimension %d of %s",
                          (long long)shape[i], i, ws_tensor_label(t, lb, sizeof lb));
        /* A product that wraps could equal numel; one past the largest
         * addressable tensor (0-sized dimensions aside) is refused. */
        if (shape[i] && __builtin_mul_overflow(nonzero, shape[i], &nonzero))
            nonzero = INT64_MAX;
        if (nonzero > INT64_MAX / 8)
            return WS_ERR(WS_ERR_ARG, "reshape: the requested shape for %s %s is too large "
                          "to address", ws_tensor_label(t, lb, sizeof lb),
                          ws_tensor_typestr(t, ty, sizeof ty));
        known *= shape[i];
    }
    if (infer >= 0) {
        if (known == 0 || numel % known != 0)
            return WS_ERR(WS_ERR_ARG, "reshape: cannot infer dimension %d of %s %s (%lld "
                          "elements)", infer, ws_tensor_label(t, lb, sizeof lb),
                          ws_tensor_typestr(t, ty, sizeof ty), (long long)numel);
        dims[infer] = numel / known;
        known *= dims[infer];
    }
    if (known != numel) {
        ws_tensor want = {.dtype = t->dtype};
        ws_layout_contiguous(&want.layout, ndim, dims);
        char ty2[160];
        return WS_ERR(WS_ERR_ARG,
                      "reshape: cannot view tensor %s %s (%lld elements) as %s (%lld elements)",
                      ws_tensor_label(t, lb, sizeof lb), ws_tensor_typestr(t, ty, sizeof ty),
                      (long long)numel, ws_tensor_typestr(&want, ty2, sizeof ty2),
                      (long long)known);
    }
    ws_layout l;
    ws_layout_contiguous(&l, ndim, dims);
    return make_view(out, t, t->offset, t->dtype, &l);
}

ws_status ws_tensor_flat_bytes(ws_tensor *out, const ws_tensor *t)
{
    WS_TRY(ws_tensor_check_live(t, "bytes"));
    char lb[200], ty[160];
    if (!ws_tensor_is_contiguous(t))
        return WS_ERR(WS_ERR_ARG, "bytes: tensor %s %s is not contiguous; copy it first",
                      ws_tensor_label(t, lb, sizeof lb), ws_tensor_typestr(t, ty, sizeof ty));
    int64_t n = (int64_t)ws_tensor_nbytes(t);
    ws_layout l;
    ws_layout_contiguous(&l, 1, &n);
    return make_view(out, t, t->offset, WS_U8, &l);
}

ws_status ws_tensor_view_dtype(ws_tensor *out, const ws_tensor *t, ws_dtype dtype)
{
    WS_TRY(ws_tensor_check_live(t, "view"));
    char lb[200], ty[160];
    if ((unsigned)dtype >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "view: unknown dtype %d", (int)dtype);
    size_t from = ws_dtype_size(t->dtype), to = ws_dtype_size(dtype);
    ws_layout l = t->layout;
    if (from != to) {
        int last = l.ndim - 1;
        if (last < 0 || !ws_tensor_is_contiguous(t) ||
            ((size_t)l.shape[last] * from) % to != 0 || t->offset % to != 0)
            return WS_ERR(WS_ERR_ARG,
                          "view: cannot reinterpret tensor %s %s as %s: it must be contiguous "
                          "and its last dimension must hold a whole number of %s elements",
                          ws_tensor_label(t, lb, sizeof lb), ws_tensor_typestr(t, ty, sizeof ty),
                          ws_dtype_name(dtype), ws_dtype_name(dtype));
        int64_t shape[WS_MAX_DIMS];
        memcpy(shape, l.shape, sizeof shape);
        shape[last] = (int64_t)((size_t)shape[last] * from / to);
        ws_layout_contiguous(&l, l.ndim, shape);
    }
    return make_view(out, t, t->offset, dtype, &l);
}

/* ---- fill, random, checksum, element access ---------------------------------------------- */

/* Non-contiguous targets are produced contiguously in a temporary on the
 * same device and then copied in with one strided copy. */
static ws_status via_contiguous(ws_tensor *t, ws_status (*produce)(ws_tensor *, void *),
                                void *ctx)
{
    ws_tensor tmp;
    ws_tensor_opts o = {.device = ws_tensor_device(t)};
    WS_TRY(ws_tensor_empty(&tmp, t->dtype, t->layout.ndim, t->layout.shape, &o));
    ws_status rc = produce(&tmp, ctx);
    if (rc == WS_OK) rc = ws_tensor_copy(t, &tmp);
    ws_tensor_free(&tmp);
    return rc;
}

static ws_status fill_contig(ws_tensor *t, void *ctx)
{
    ws_device *d = ws_tensor_device(t);
    void *ptr;
    WS_TRY(ws_tensor_access(t, WS_ACCESS_WRITE, "fill", &ptr));
    return d->ops->fill(d, ptr, t->dtype, (size_t)ws_tensor_numel(t), *(const double *)ctx);
}

/* Writes every element of t with `produce` (fill or random, named by what):
 * directly when t is contiguous, else through a contiguous temporary. */
static ws_status overwrite(ws_tensor *t, const char *what,
                           ws_status (*produce)(ws_tensor *, void *), void *ctx)
{
    WS_TRY(ws_tensor_check_writable(t, what));
    if (ws_tensor_numel(t) == 0) return WS_OK;
    ws_status rc = ws_tensor_is_contiguous(t) ? produce(t, ctx) : via_contiguous(t, produce, ctx);
    if (rc != WS_OK) {
        char lb[200];
        ws_errprefix("%s %s", what, ws_tensor_label(t, lb, sizeof lb));
        return rc;
    }
    ws_tensor_mark_written(t);
    return WS_OK;
}

/* Integer elements take only the values they hold exactly: storing 2^40 in
 * an i32 as 2147483647, -1 in a u8 as 0 or 1.5 in an i64 as 1 would change
 * the data without a word. Float dtypes round, as their arithmetic does. */
static ws_status check_value(const ws_tensor *t, double v, const char *what)
{
    int64_t lo, hi; /* [lo, hi] */
    switch (t->dtype) {
    case WS_U8: lo = 0, hi = UINT8_MAX; break;
    case WS_I32: lo = INT32_MIN, hi = INT32_MAX; break;
    case WS_I64: lo = INT64_MIN, hi = INT64_MAX; break;
    default: return WS_OK;
    }
    /* hi + 1 is exact in a double for each (2^8, 2^31, 2^63). False for NaN. */
    int in_range = v >= (double)lo && v < (double)hi + 1.0;
    if (in_range && (double)(int64_t)v == v) return WS_OK;
    char lb[200], vb[40];
    if (v != v) snprintf(vb, sizeof vb, "nan"); /* not "-nan" */
    else snprintf(vb, sizeof vb, "%.17g", v);
    if (in_range || v != v)
        return WS_ERR(WS_ERR_ARG, "%s: value %s is not an integer; tensor %s holds %s", what, vb,
                      ws_tensor_label(t, lb, sizeof lb), ws_dtype_name(t->dtype));
    return WS_ERR(WS_ERR_ARG, "%s: value %s is out of range for %s (%lld to %lld) of tensor %s",
                  what, vb, ws_dtype_name(t->dtype), (long long)lo, (long long)hi,
                  ws_tensor_label(t, lb, sizeof lb));
}

ws_status ws_tensor_fill(ws_tensor *t, double value)
{
    WS_TRY(ws_tensor_check_live(t, "fill"));
    WS_TRY(check_value(t, value, "fill"));
    return overwrite(t, "fill", fill_contig, &value);
}

typedef struct {
    uint64_t seed, first;
    float scale;
} random_args;

static ws_status random_contig(ws_tensor *t, void *ctx)
{
    const random_args *a = ctx;
    ws_device *d = ws_tensor_device(t);
    void *ptr;
    WS_TRY(ws_tensor_access(t, WS_ACCESS_WRITE, "random", &ptr));
    return d->ops->random(d, ptr, t->dtype, (size_t)ws_tensor_numel(t), a->seed, a->first,
                          a->scale);
}

ws_status ws_tensor_random(ws_tensor *t, uint64_t seed, float scale, uint64_t first_index)
{
    random_args a = {seed, first_index, scale};
    return overwrite(t, "random", random_contig, &a);
}

ws_status ws_tensor_checksum(const ws_tensor *t, uint64_t first_index, ws_dtype as, uint64_t *out)
{
    *out = 0;
    void *ptr;
    WS_TRY(ws_tensor_access(t, WS_ACCESS_READ, "checksum", &ptr));
    if ((unsigned)as >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "checksum: unknown dtype %d", (int)as);
    ws_device *d = ws_tensor_device(t);
    ws_status rc = d->ops->checksum(d, ptr, t->dtype, &t->layout, first_index, as, out);
    if (rc != WS_OK) {
        char lb[200];
        ws_errprefix("checksum %s", ws_tensor_label(t, lb, sizeof lb));
    }
    return rc;
}

ws_status ws_tensor_checksum_rows(const ws_tensor *t, uint64_t first_index, int64_t cols,
                                  int64_t pitch, ws_dtype as, uint64_t *out)
{
    if (cols == 0) return ws_tensor_checksum(t, first_index, as, out);
    *out = 0;
    char lb[200];
    void *ptr;
    WS_TRY(ws_tensor_access(t, WS_ACCESS_READ, "checksum", &ptr));
    if ((unsigned)as >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "checksum: unknown dtype %d", (int)as);
    int64_t n = ws_tensor_numel(t);
    if (cols <= 0 || pitch < cols || n % cols != 0 || !ws_tensor_is_contiguous(t))
        return WS_ERR(WS_ERR_ARG,
                      "checksum %s: rows of %lld elements every %lld need a contiguous tensor "
                      "whose %lld elements are whole rows, and pitch >= cols",
                      ws_tensor_label(t, lb, sizeof lb), (long long)cols, (long long)pitch,
                      (long long)n);
    ws_device *d = ws_tensor_device(t);
    int64_t rows = n / cols;
    ws_status rc = WS_OK;
    if (d->ops->checksum_rows) {
        rc = d->ops->checksum_rows(d, ptr, t->dtype, rows, cols, first_index, (uint64_t)pitch, as,
                                   out);
    } else {
        ws_layout row = {.ndim = 1, .shape = {cols}, .strides = {1}};
        size_t es = ws_dtype_size(t->dtype);
        for (int64_t i = 0; i < rows && rc == WS_OK; i++) {
            uint64_t s = 0;
            rc = d->ops->checksum(d, (char *)ptr + (size_t)(i * cols) * es, t->dtype, &row,
                                  first_index + (uint64_t)i * (uint64_t)pitch, as, &s);
            *out += s;
        }
    }
    if (rc != WS_OK) ws_errprefix("checksum %s", ws_tensor_label(t, lb, sizeof lb));
    return rc;
}

/* Byte offset (from the view's data pointer) of row-major element `flat`. */
static ws_status element_offset(const ws_tensor *t, int64_t flat, const char *what,
                                int64_t *byte_off)
{
    int64_t numel = ws_tensor_numel(t);
    if (flat < 0 || flat >= numel) {
        char lb[200], ty[160];
        return WS_ERR(WS_ERR_ARG, "%s: index %lld out of range for tensor %s %s (%lld elements)",
                      what, (long long)flat, ws_tensor_label(t, lb, sizeof lb),
                      ws_tensor_typestr(t, ty, sizeof ty), (long long)numel);
    }
    int64_t off = 0;
    for (int i = t->layout.ndim - 1; i >= 0; i--) {
        int64_t s = t->layout.shape[i];
        off += (flat % s) * t->layout.strides[i];
        flat /= s;
    }
    *byte_off = off * (int64_t)ws_dtype_size(t->dtype);
    return WS_OK;
}

/* The address of one element, checked for `access` (only this element has to
 * hold valid data for a read), after the device's pending work. */
static ws_status element_ptr(const ws_tensor *t, int64_t flat_index, int access,
                             const char *what, size_t *offset, void **ptr)
{
    WS_TRY(ws_tensor_check_live(t, what));
    int64_t off = 0;
    WS_TRY(element_offset(t, flat_index, what, &off));
    ws_tensor elem = *t;
    elem.offset = t->offset + (size_t)off;
    elem.layout.ndim = 0;
    WS_TRY(ws_tensor_access(&elem, access, what, ptr));
    *offset = elem.offset;
    return ws_device_synchronize(ws_tensor_device(t));
}

/* One element's raw bits (zero-extended), read from any device. */
ws_status ws_tensor_get_bits(const ws_tensor *t, int64_t flat_index, uint64_t *out)
{
    size_t offset;
    void *ptr;
    WS_TRY(element_ptr(t, flat_index, WS_ACCESS_READ, "get", &offset, &ptr));
    ws_device *d = ws_tensor_device(t);
    unsigned char buf[8];
    WS_TRY(d->ops->copy(d, buf, ptr, ws_dtype_size(t->dtype)));
    *out = ws_load_bits(buf, t->dtype);
    return WS_OK;
}

ws_status ws_tensor_set_bits(ws_tensor *t, int64_t flat_index, uint64_t bits)
{
    size_t offset;
    void *ptr;
    WS_TRY(element_ptr(t, flat_index, WS_ACCESS_WRITE, "set", &offset, &ptr));
    ws_device *d = ws_tensor_device(t);
    size_t es = ws_dtype_size(t->dtype);
    unsigned char buf[8];
    memcpy(buf, &bits, es); /* little-endian: the low bytes are the element */
    WS_TRY(d->ops->copy(d, ptr, buf, es));
    mark_span(t->storage, offset, offset + es);
    return WS_OK;
}

ws_status ws_tensor_get(const ws_tensor *t, int64_t flat_index, double *out)
{
    uint64_t bits;
    WS_TRY(ws_tensor_get_bits(t, flat_index, &bits));
    unsigned char buf[8];
    memcpy(buf, &bits, sizeof buf);
    *out = ws_load_scalar(buf, t->dtype);
    return WS_OK;
}

ws_status ws_tensor_set(ws_tensor *t, int64_t flat_index, double value)
{
    WS_TRY(ws_tensor_check_live(t, "set"));
    WS_TRY(check_value(t, value, "set"));
    unsigned char buf[8] = {0};
    ws_store_scalar(buf, t->dtype, value);
    uint64_t bits;
    memcpy(&bits, buf, sizeof bits);
    return ws_tensor_set_bits(t, flat_index, bits);
}
