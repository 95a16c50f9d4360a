/* copy.c: copies between tensors, one (ws_tensor_copy) or many at once.
 *
 * The batched forms (pack, unpack, copy_many) validate every tensor first,
 * then hand one descriptor array to the device's copy_batch, so a hundred
 * thousand small tensors cost one call and one allocation, not a hundred
 * thousand. A single copy between devices moves raw bytes across the link and
 * converts or gathers on one side (the GPU when there is one), staging through
 * a contiguous temporary when needed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"
#include "tensor.h"

static ws_status shape_mismatch(const char *what, const ws_tensor *dst, const ws_tensor *src)
{
    char l1[200], l2[200], t1[160], t2[160];
    return WS_ERR(WS_ERR_ARG, "%s: shape mismatch: dst %s is %s, src %s is %s", what,
                  ws_tensor_label(dst, l1, sizeof l1), ws_tensor_typestr(dst, t1, sizeof t1),
                  ws_tensor_label(src, l2, sizeof l2), ws_tensor_typestr(src, t2, sizeof t2));
}

/* Both tensors on device d (live, checked, same shape). */
static ws_status same_device_copy(ws_device *d, ws_tensor *dst, const ws_tensor *src)
{
    void *dp, *sp;
    WS_TRY(ws_tensor_access(dst, WS_ACCESS_WRITE, "copy_ dst", &dp));
    WS_TRY(ws_tensor_access(src, WS_ACCESS_READ, "copy_ src", &sp));
    if (ws_tensor_is_contiguous(dst) && ws_tensor_is_contiguous(src)) {
        if (dst->dtype == src->dtype) return d->ops->copy(d, dp, sp, ws_tensor_nbytes(dst));
        ws_copy_desc desc = {dp, sp, (size_t)ws_tensor_numel(dst), dst->dtype, src->dtype};
        return d->ops->copy_batch(d, &desc, 1);
    }
    return d->ops->copy_strided(d, dp, dst->dtype, &dst->layout, sp, src->dtype, &src->layout);
}

static ws_status contiguous_temp(ws_tensor *tmp, ws_device *d, ws_dtype dtype,
                                 const ws_tensor *like)
{
    ws_tensor_opts o = {.device = d};
    return ws_tensor_empty(tmp, dtype, like->layout.ndim, like->layout.shape, &o);
}

/* Devices differ: at least one is a GPU, which does conversions and gathers. */
static ws_status cross_device_copy(ws_tensor *dst, const ws_tensor *src)
{
    ws_device *dd = ws_tensor_device(dst), *sd = ws_tensor_device(src);
    ws_device *x = dd->kind == WS_DEVICE_CUDA ? dd : sd;
    ws_tensor ts = {0}, td = {0};
    const ws_tensor *s = src;
    ws_status rc = WS_OK;
    if (!ws_tensor_is_contiguous(src) || (src->dtype != dst->dtype && x == sd)) {
        rc = contiguous_temp(&ts, sd, x == sd ? dst->dtype : src->dtype, src);
        if (rc == WS_OK) rc = same_device_copy(sd, &ts, src);
        s = &ts;
    }
    void *sp = NULL, *dp = NULL;
    if (rc == WS_OK) rc = ws_tensor_access(s, WS_ACCESS_READ, "copy_ src", &sp);
    if (rc == WS_OK) {
        if (!ws_tensor_is_contiguous(dst) || s->dtype != dst->dtype) {
            rc = contiguous_temp(&td, dd, s->dtype, dst);
            if (rc == WS_OK) rc = ws_tensor_access(&td, WS_ACCESS_WRITE, "copy_ staging", &dp);
            if (rc == WS_OK) rc = x->ops->copy(x, dp, sp, ws_tensor_nbytes(s));
            if (rc == WS_OK) {
                ws_tensor_mark_written(&td);
                rc = same_device_copy(dd, dst, &td);
            }
        } else {
            rc = ws_tensor_access(dst, WS_ACCESS_WRITE, "copy_ dst", &dp);
            if (rc == WS_OK) rc = x->ops->copy(x, dp, sp, ws_tensor_nbytes(s));
        }
    }
    ws_tensor_free(&ts);
    ws_tensor_free(&td);
    return rc;
}

/* Two views of one storage whose byte spans intersect (conservative for
 * interleaved strided views, which are then staged without need). */
static int spans_overlap(const ws_tensor *a, const ws_tensor *b)
{
    if (a->storage != b->storage) return 0;
    size_t ab, ae, bb, be;
    ws_tensor_byte_span(a, &ab, &ae);
    ws_tensor_byte_span(b, &bb, &be);
    return ab < be && bb < ae;
}

static int same_view(const ws_tensor *a, const ws_tensor *b)
{
    if (a->storage != b->storage || a->offset != b->offset || a->dtype != b->dtype) return 0;
    for (int i = 0; i < a->layout.ndim; i++)
        if (a->layout.strides[i] != b->layout.strides[i]) return 0;
    return 1;
}

/* dst and src overlap: the source is read completely (into a temporary)
 * before anything is written, as memmove does; chunked parallel copies
 * would otherwise read bytes another chunk already overwrote. */
static ws_status overlapping_copy(ws_device *d, ws_tensor *dst, const ws_tensor *src)
{
    if (same_view(dst, src)) return WS_OK;
    ws_tensor tmp;
    WS_TRY(contiguous_temp(&tmp, d, src->dtype, src));
    ws_status rc = same_device_copy(d, &tmp, src);
    if (rc == WS_OK) rc = same_device_copy(d, dst, &tmp);
    ws_tensor_free(&tmp);
    return rc;
}

ws_status ws_tensor_copy(ws_tensor *dst, const ws_tensor *src)
{
    WS_TRY(ws_tensor_check_writable(dst, "copy_ dst"));
    WS_TRY(ws_tensor_check_readable(src, "copy_ src"));
    if (!ws_tensor_same_shape(dst, src)) return shape_mismatch("copy_", dst, src);
    if (ws_tensor_numel(dst) == 0) return WS_OK;
    ws_device *dd = ws_tensor_device(dst), *sd = ws_tensor_device(src);
    ws_status rc = spans_overlap(dst, src) ? overlapping_copy(dd, dst, src)
                   : dd == sd              ? same_device_copy(dd, dst, src)
                                           : cross_device_copy(dst, src);
    if (rc != WS_OK) {
        char l1[200], l2[200];
        ws_errprefix("copy_ %s (%s) <- %s (%s)", ws_tensor_label(dst, l1, sizeof l1), dd->name,
                     ws_tensor_label(src, l2, sizeof l2), sd->name);
        return rc;
    }
    ws_tensor_mark_written(dst);
    return WS_OK;
}

/* ---- batched copies --------------------------------------------------------------- */

static ws_status alloc_descs(size_t n, const char *what, ws_copy_desc **out)
{
    *out = NULL;
    if (n > SIZE_MAX / sizeof(ws_copy_desc) || !(*out = ws_malloc(n * sizeof **out)))
        return WS_ERR(WS_ERR_NOMEM, "%s: out of memory for %zu copy descriptors", what, n);
    return WS_OK;
}

/* Checks item i and hands out its data pointer. Cheap checks first; the
 * message (with its snprintf) is only built for a failing item, so
 * validating 100k tensors costs microseconds. */
static ws_status check_item(const ws_tensor *t, size_t i, const char *what, const char *role,
                            ws_device *dev, int write, void **ptr)
{
    int access = write ? WS_ACCESS_WRITE : WS_ACCESS_READ;
    if (t && t->storage && ws_tensor_is_contiguous(t) && ws_tensor_device(t) == dev &&
        ws_tensor_access(t, access, what, ptr) == WS_OK)
        return WS_OK;
    char ctx[96];
    snprintf(ctx, sizeof ctx, "%s %s %zu", what, role, i + 1);
    WS_TRY(ws_tensor_access(t, access, ctx, ptr));
    char lb[200], ty[160];
    if (!ws_tensor_is_contiguous(t))
        return WS_ERR(WS_ERR_ARG, "%s: tensor %s %s is not contiguous; copy it to a contiguous "
                      "tensor first", ctx, ws_tensor_label(t, lb, sizeof lb),
                      ws_tensor_typestr(t, ty, sizeof ty));
    return WS_ERR(WS_ERR_ARG, "%s: tensor %s is on %s but the batch runs on %s; move it "
                  "there first (copy_)", ctx, ws_tensor_label(t, lb, sizeof lb),
                  ws_tensor_device(t)->name, dev->name);
}

/* Elements item i occupies in flat (raw bytes when flat is u8), and its
 * offset: given, or right after the previous item. */
static size_t item_count(const ws_tensor *flat, const ws_tensor *t)
{
    return flat->dtype == WS_U8 ? ws_tensor_nbytes(t) : (size_t)ws_tensor_numel(t);
}

static ws_status check_fits(const char *what, const ws_tensor *flat, const ws_tensor *t, size_t i,
                            size_t off, size_t count)
{
    size_t cap = (size_t)ws_tensor_numel(flat);
    if (off <= cap && count <= cap - off) return WS_OK;
    char l1[200], l2[200];
    return WS_ERR(WS_ERR_ARG, "%s: item %zu %s (%zu elements at offset %zu) does not fit in flat "
                  "%s of %zu elements", what, i + 1, ws_tensor_label(t, l1, sizeof l1), count,
                  off, ws_tensor_label(flat, l2, sizeof l2), cap);
}

/* The flat tensor's elements [off, off+count) as a stack view (no reference). */
static ws_tensor flat_piece(const ws_tensor *flat, size_t off, size_t count)
{
    ws_tensor v = *flat;
    v.offset = flat->offset + off * ws_dtype_size(flat->dtype);
    int64_t n = (int64_t)count;
    ws_layout_contiguous(&v.layout, 1, &n);
    return v;
}

static ws_status check_flat(const ws_tensor *flat, const char *what, int write)
{
    char ctx[64];
    snprintf(ctx, sizeof ctx, "%s flat", what);
    WS_TRY(write ? ws_tensor_check_writable(flat, ctx) : ws_tensor_check_live(flat, ctx));
    if (!ws_tensor_is_contiguous(flat)) {
        char lb[200];
        return WS_ERR(WS_ERR_ARG, "%s: flat tensor %s is not contiguous", ctx,
                      ws_tensor_label(flat, lb, sizeof lb));
    }
    return WS_OK;
}

/* pack (to_flat) or unpack: checks every item while building the
 * descriptors, then runs them as one batch. */
static ws_status flat_batch(const char *what, int to_flat, const ws_tensor *flat,
                            const ws_tensor *const *ts, size_t n, const size_t *offsets)
{
    WS_TRY(check_flat(flat, what, to_flat));
    if (n == 0) return WS_OK;
    ws_device *dev = ws_tensor_device(flat);
    int raw = flat->dtype == WS_U8;
    int flat_in_pool = flat->storage->kind == WS_STORAGE_POOL;
    ws_copy_desc *descs;
    WS_TRY(alloc_descs(n, what, &descs));
    ws_status rc = WS_OK;
    size_t next = 0;
    for (size_t i = 0; i < n; i++) {
        const ws_tensor *t = ts[i];
        void *tp, *fp;
        rc = check_item(t, i, what, to_flat ? "src" : "dst", dev, !to_flat, &tp);
        if (rc != WS_OK) break;
        size_t count = item_count(flat, t);
        size_t off = offsets ? offsets[i] : next;
        rc = check_fits(what, flat, t, i, off, count);
        if (rc != WS_OK) break;
        /* Only the piece an item uses has to hold data for an unpack. */
        ws_tensor piece = flat_piece(flat, off, count);
        int access = to_flat ? WS_ACCESS_WRITE : WS_ACCESS_READ;
        if (ws_tensor_access(&piece, access, what, &fp) != WS_OK) {
            char ctx[96];
            snprintf(ctx, sizeof ctx, "%s flat (item %zu)", what, i + 1);
            rc = ws_tensor_access(&piece, access, ctx, &fp);
            break;
        }
        ws_dtype other = raw ? WS_U8 : t->dtype;
        if (to_flat)
            descs[i] = (ws_copy_desc){fp, tp, count, flat->dtype, other};
        else
            descs[i] = (ws_copy_desc){tp, fp, count, other, flat->dtype};
        next = off + count;
    }
    if (rc != WS_OK) {
        free(descs);
        return rc;
    }
    rc = dev->ops->copy_batch(dev, descs, n);
    if (rc != WS_OK) {
        free(descs);
        char lb[200];
        ws_errprefix("%s %zu tensors %s flat %s", what, n, to_flat ? "into" : "from",
                     ws_tensor_label(flat, lb, sizeof lb));
        return rc;
    }
    /* Record what was written (pool storage only); adjacent pieces merge. */
    if (to_flat && flat_in_pool) {
        size_t next_off = 0;
        for (size_t i = 0; i < n; i++) {
            size_t off = offsets ? offsets[i] : next_off;
            ws_tensor piece = flat_piece(flat, off, descs[i].count);
            ws_tensor_mark_written(&piece);
            next_off = off + descs[i].count;
        }
    } else if (!to_flat) {
        for (size_t i = 0; i < n; i++)
            if (ts[i]->storage->kind == WS_STORAGE_POOL) ws_tensor_mark_written(ts[i]);
    }
    free(descs);
    return WS_OK;
}

ws_status ws_pack(ws_tensor *flat, const ws_tensor *const *srcs, size_t n, const size_t *offsets)
{
    return flat_batch("pack", 1, flat, srcs, n, offsets);
}

ws_status ws_unpack(const ws_tensor *flat, ws_tensor *const *dsts, size_t n,
                    const size_t *offsets)
{
    return flat_batch("unpack", 0, flat, (const ws_tensor *const *)dsts, n, offsets);
}

ws_status ws_copy_many(ws_tensor *const *dsts, const ws_tensor *const *srcs, size_t n)
{
    if (n == 0) return WS_OK;
    WS_TRY(ws_tensor_check_live(dsts[0], "copy_many dst 1"));
    ws_device *dev = ws_tensor_device(dsts[0]);
    ws_copy_desc *descs;
    WS_TRY(alloc_descs(n, "copy_many", &descs));
    ws_status rc = WS_OK;
    for (size_t i = 0; i < n && rc == WS_OK; i++) {
        void *dp, *sp;
        rc = check_item(dsts[i], i, "copy_many", "dst", dev, 1, &dp);
        if (rc == WS_OK) rc = check_item(srcs[i], i, "copy_many", "src", dev, 0, &sp);
        if (rc == WS_OK && !ws_tensor_same_shape(dsts[i], srcs[i])) {
            char ctx[64];
            snprintf(ctx, sizeof ctx, "copy_many item %zu", i + 1);
            rc = shape_mismatch(ctx, dsts[i], srcs[i]);
        }
        if (rc == WS_OK)
            descs[i] = (ws_copy_desc){dp, sp, (size_t)ws_tensor_numel(dsts[i]), dsts[i]->dtype,
                                      srcs[i]->dtype};
    }
    if (rc != WS_OK) {
        free(descs);
        return rc;
    }
    rc = dev->ops->copy_batch(dev, descs, n);
    free(descs);
    if (rc != WS_OK) {
        ws_errprefix("copy_many of %zu tensors on %s", n, dev->name);
        return rc;
    }
    for (size_t i = 0; i < n; i++) ws_tensor_mark_written(dsts[i]);
    return WS_OK;
}

ws_status ws_checksum_many(const ws_tensor *const *ts, size_t n, const uint64_t *first,
                           ws_dtype as, uint64_t *out)
{
    return ws_checksum_many_rows(ts, n, first, NULL, NULL, as, out);
}

ws_status ws_checksum_many_rows(const ws_tensor *const *ts, size_t n, const uint64_t *first,
                                const int64_t *cols, const int64_t *pitch, ws_dtype as,
                                uint64_t *out)
{
    for (size_t i = 0; i < n; i++) {
        /* A NULL item keeps `as` and fails in ws_tensor_checksum's check. */
        ws_dtype a = as == WS_DTYPE_COUNT && ts[i] ? ts[i]->dtype : as;
        uint64_t f = first ? first[i] : 0;
        ws_status rc = cols && cols[i] ? ws_tensor_checksum_rows(ts[i], f, cols[i], pitch[i], a,
                                                                 &out[i])
                                       : ws_tensor_checksum(ts[i], f, a, &out[i]);
        if (rc != WS_OK) {
            ws_errprefix("checksums: item %zu", i + 1);
            return rc;
        }
    }
    return WS_OK;
}
