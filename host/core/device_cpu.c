/* device_cpu.c: the cpu device backend (host memory).
 *
 * Memory: small blocks come from the C heap (64-byte aligned); blocks of a
 * megabyte or more are their own anonymous mappings, page aligned, so freeing
 * them returns memory to the OS at once. Byte loops (copies, conversions,
 * fills, checksums) are split across the worker threads of parallel.c, since
 * one core cannot saturate memory bandwidth. Pools reserve address space with
 * mmap(PROT_NONE) and map/unmap it with mprotect + madvise(MADV_DONTNEED),
 * which really drops the pages (RSS falls) while addresses stay valid. Pool
 * ranges and host (backup) blocks are aligned to 2 MiB and ask for
 * transparent huge pages: a fresh page costs one fault per 2 MiB, not 512,
 * which is what lets a pool wake (or a backup fill) at copy speed. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "device.h"
#include "fault.h"
#include "parallel.h"
#include "quant.h"

#define CPU_ALIGN 64
#define CPU_MMAP_MIN ((size_t)1 << 20)  /* blocks this large get their own mapping */
#define PAR_BYTES ((size_t)1 << 20)     /* below this, one thread is as fast */
#define HUGE_BYTES ((size_t)2 << 20)    /* a transparent huge page (x86-64, arm64 with 4K pages) */

/* Linux 5.14; older headers lack it, older kernels answer EINVAL. */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

struct ws_event {
    struct timespec ts;
};

static size_t page_size(void)
{
    static size_t ps;
    if (!ps) {
        long v = sysconf(_SC_PAGESIZE);
        ps = v > 0 ? (size_t)v : 4096;
    }
    return ps;
}

static ws_status nomem(size_t bytes, int err)
{
    char h[32];
    ws_format_bytes(h, sizeof h, bytes);
    return WS_ERR(WS_ERR_NOMEM,
                  "cpu: out of memory allocating %s (%zu bytes): %s; free tensors or use "
                  "smaller buckets",
                  h, bytes, strerror(err));
}

/* An anonymous mapping of `len` bytes (page aligned) starting on a 2 MiB
 * boundary, so the kernel can back all of it with huge pages: the extra
 * 2 MiB mapped to find the boundary are unmapped again at once, and the
 * block is then exactly [result, result + len), as munmap expects. */
static void *map_huge_aligned(size_t len, int prot)
{
    if (len < HUGE_BYTES) return mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (len > SIZE_MAX - HUGE_BYTES) {
        errno = ENOMEM;
        return MAP_FAILED;
    }
    char *raw = mmap(NULL, len + HUGE_BYTES, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return raw;
    uintptr_t a = ((uintptr_t)raw + HUGE_BYTES - 1) & ~(uintptr_t)(HUGE_BYTES - 1);
    size_t head = a - (uintptr_t)raw;
    if (head) munmap(raw, head);
    if (HUGE_BYTES - head) munmap((char *)a + len, HUGE_BYTES - head);
#ifdef MADV_HUGEPAGE
    /* Advice only: with THP off ("never") the pages stay 4 KiB. */
    madvise((void *)a, len, MADV_HUGEPAGE);
#endif
    return (void *)a;
}

static int populate_missing; /* the kernel has no MADV_POPULATE_WRITE */

typedef struct {
    char *base;
    size_t len;
} populate_ctx;

/* Huge-page units [begin, end) of the range. */
static void populate_range(void *vctx, size_t begin, size_t end, int worker)
{
    const populate_ctx *c = vctx;
    if (__atomic_load_n(&populate_missing, __ATOMIC_RELAXED)) return;
    size_t b = begin * HUGE_BYTES, e = end * HUGE_BYTES < c->len ? end * HUGE_BYTES : c->len;
    if (madvise(c->base + b, e - b, MADV_POPULATE_WRITE) != 0 && errno == EINVAL)
        __atomic_store_n(&populate_missing, 1, __ATOMIC_RELAXED);
}

/* Makes [ptr, ptr + len) resident and writable now (ptr page aligned), the
 * worker threads faulting in parallel, instead of one fault per page inside
 * the copy that follows. Best effort: an old kernel (EINVAL) or a shortage
 * (ENOMEM, which the copy would meet anyway) leaves the pages to the copy. */
static void populate(void *ptr, size_t len)
{
    if (len < PAR_BYTES || __atomic_load_n(&populate_missing, __ATOMIC_RELAXED)) return;
    populate_ctx c = {ptr, len};
    ws_parallel_for((len + HUGE_BYTES - 1) / HUGE_BYTES, 4, populate_range, &c);
}

static ws_status cpu_alloc(ws_device *d, size_t bytes, void **out)
{
    *out = NULL;
    if (bytes >= CPU_MMAP_MIN) {
        size_t ps = page_size();
        if (bytes > SIZE_MAX - ps) return nomem(bytes, ENOMEM);
        size_t len = (bytes + ps - 1) & ~(ps - 1);
        void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return nomem(bytes, errno);
        *out = p;
    } else {
        size_t len = (bytes + CPU_ALIGN - 1) & ~(size_t)(CPU_ALIGN - 1);
        void *p = NULL;
        int rc = posix_memalign(&p, CPU_ALIGN, len ? len : CPU_ALIGN);
        if (rc != 0) return nomem(bytes, rc);
        *out = p;
    }
    ws_device_account(d, (ptrdiff_t)bytes);
    return WS_OK;
}

static void cpu_free(ws_device *d, void *ptr, size_t bytes)
{
    if (!ptr) return;
    if (bytes >= CPU_MMAP_MIN) {
        size_t ps = page_size();
        munmap(ptr, (bytes + ps - 1) & ~(ps - 1));
    } else {
        free(ptr);
    }
    ws_device_account(d, -(ptrdiff_t)bytes);
}

/* Host memory for pool backups (and pinned tensors): on a GPU this is pinned,
 * resident from the start. Here it is made resident at once too, on huge
 * pages, so the first level-1 sleep copies into it at copy speed rather than
 * page-faulting through it. */
static ws_status cpu_host_alloc(ws_device *d, size_t bytes, void **out)
{
    if (bytes < CPU_MMAP_MIN) return cpu_alloc(d, bytes, out);
    *out = NULL;
    size_t ps = page_size();
    if (bytes > SIZE_MAX - ps) return nomem(bytes, ENOMEM);
    size_t len = (bytes + ps - 1) & ~(ps - 1);
    void *p = map_huge_aligned(len, PROT_READ | PROT_WRITE);
    if (p == MAP_FAILED) return nomem(bytes, errno);
    populate(p, len);
    *out = p;
    ws_device_account(d, (ptrdiff_t)bytes);
    return WS_OK;
}

/* ---- copies ------------------------------------------------------------------ */

typedef struct {
    char *dst;
    const char *src;
} bytes_ctx;

static void copy_range(void *vctx, size_t begin, size_t end, int worker)
{
    bytes_ctx *c = vctx;
    memcpy(c->dst + begin, c->src + begin, end - begin);
}

static void par_memcpy(void *dst, const void *src, size_t bytes)
{
    if (bytes < PAR_BYTES) {
        memcpy(dst, src, bytes);
        return;
    }
    bytes_ctx c = {dst, src};
    ws_parallel_for(bytes, PAR_BYTES / 2, copy_range, &c);
}

static ws_status cpu_copy(ws_device *d, void *dst, const void *src, size_t bytes)
{
    if (bytes && dst != src) par_memcpy(dst, src, bytes);
    return WS_OK;
}

/* Copies elements [begin, end) of one descriptor. */
static void desc_range(const ws_copy_desc *c, size_t begin, size_t end)
{
    size_t ds = ws_dtype_size(c->dst_dtype), ss = ws_dtype_size(c->src_dtype);
    if (end == begin) return; /* empty tensors may have NULL data */
    if (c->dst_dtype == c->src_dtype)
        memcpy((char *)c->dst + begin * ds, (const char *)c->src + begin * ss, (end - begin) * ds);
    else
        ws_convert_host((char *)c->dst + begin * ds, c->dst_dtype,
                        (const char *)c->src + begin * ss, c->src_dtype, end - begin);
}

static size_t desc_bytes(const ws_copy_desc *c)
{
    size_t ds = ws_dtype_size(c->dst_dtype), ss = ws_dtype_size(c->src_dtype);
    return c->count * (ds > ss ? ds : ss);
}

/* A batch is cut into pieces of about PIECE_BYTES (a small descriptor is one
 * piece) and the pieces of all descriptors go through one parallel loop: one
 * fork-join per batch, not one per tensor, which on a 2-core machine cost
 * more than the second core gained for a model's 300 tensors. */
#define PIECE_BYTES ((size_t)256 << 10)

typedef struct {
    const ws_copy_desc *descs;
    const size_t *first; /* first[i]: index of descriptor i's first piece; first[n]: total */
    size_t n;
} batch_ctx;

static size_t piece_elems(const ws_copy_desc *c)
{
    size_t per = desc_bytes(c) / c->count;
    size_t e = PIECE_BYTES / per;
    return e ? e : 1;
}

static void batch_pieces(void *vctx, size_t begin, size_t end, int worker)
{
    const batch_ctx *b = vctx;
    /* The descriptor holding piece `begin`: the last i with first[i] <= begin. */
    size_t lo = 0, hi = b->n;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (b->first[mid] <= begin) lo = mid; else hi = mid;
    }
    for (size_t i = lo, piece = begin; piece < end; i++) {
        const ws_copy_desc *c = &b->descs[i];
        size_t pe = c->count ? piece_elems(c) : 0;
        for (; piece < end && piece < b->first[i + 1]; piece++) {
            size_t a = (piece - b->first[i]) * pe;
            size_t z = a + pe < c->count ? a + pe : c->count;
            desc_range(c, a, z);
        }
    }
}

static ws_status cpu_copy_batch(ws_device *d, const ws_copy_desc *descs, size_t n)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += desc_bytes(&descs[i]);
    size_t *first = total >= PAR_BYTES ? malloc((n + 1) * sizeof *first) : NULL;
    if (!first) { /* small, or no memory for the index: one thread does it all */
        for (size_t i = 0; i < n; i++) desc_range(&descs[i], 0, descs[i].count);
        return WS_OK;
    }
    first[0] = 0;
    for (size_t i = 0; i < n; i++) {
        size_t pieces = descs[i].count ? (descs[i].count + piece_elems(&descs[i]) - 1) /
                                             piece_elems(&descs[i])
                                       : 0;
        first[i + 1] = first[i] + pieces;
    }
    batch_ctx b = {descs, first, n};
    ws_parallel_for(first[n], 1, batch_pieces, &b);
    free(first);
    return WS_OK;
}

/* ---- strided copy ---------------------------------------------------------------- */

/* Walks rows (the innermost dimension) of a layout pair from row `r0`. */
typedef struct {
    int ndim;
    int64_t idx[WS_MAX_DIMS];
    int64_t doff, soff; /* element offsets of the current row start */
} row_iter;

static void row_iter_init(row_iter *it, const ws_layout *dl, const ws_layout *sl, size_t r0)
{
    it->ndim = dl->ndim;
    it->doff = it->soff = 0;
    size_t r = r0;
    for (int i = dl->ndim - 2; i >= 0; i--) {
        int64_t s = dl->shape[i];
        it->idx[i] = (int64_t)(r % (size_t)s);
        r /= (size_t)s;
        it->doff += it->idx[i] * dl->strides[i];
        it->soff += it->idx[i] * (sl ? sl->strides[i] : 0);
    }
}

static void row_iter_next(row_iter *it, const ws_layout *dl, const ws_layout *sl)
{
    for (int i = it->ndim - 2; i >= 0; i--) {
        it->idx[i]++;
        it->doff += dl->strides[i];
        if (sl) it->soff += sl->strides[i];
        if (it->idx[i] < dl->shape[i]) return;
        it->doff -= dl->strides[i] * dl->shape[i];
        if (sl) it->soff -= sl->strides[i] * dl->shape[i];
        it->idx[i] = 0;
    }
}

typedef struct {
    char *dst;
    const char *src;
    ws_dtype dt, st;
    const ws_layout *dl, *sl;
    int64_t inner;
} strided_ctx;

static void strided_rows(void *vctx, size_t r0, size_t r1, int worker)
{
    strided_ctx *c = vctx;
    size_t ds = ws_dtype_size(c->dt), ss = ws_dtype_size(c->st);
    int last = c->dl->ndim - 1;
    int64_t dstep = last >= 0 ? c->dl->strides[last] : 1;
    int64_t sstep = last >= 0 ? c->sl->strides[last] : 1;
    row_iter it;
    row_iter_init(&it, c->dl, c->sl, r0);
    for (size_t r = r0; r < r1; r++) {
        char *d = c->dst + it.doff * (int64_t)ds;
        const char *s = c->src + it.soff * (int64_t)ss;
        if (dstep == 1 && sstep == 1) {
            ws_convert_host(d, c->dt, s, c->st, (size_t)c->inner);
        } else {
            for (int64_t j = 0; j < c->inner; j++)
                ws_convert_host(d + j * dstep * (int64_t)ds, c->dt, s + j * sstep * (int64_t)ss,
                                c->st, 1);
        }
        row_iter_next(&it, c->dl, c->sl);
    }
}

static ws_status cpu_copy_strided(ws_device *d, void *dst, ws_dtype dt, const ws_layout *dl,
                                  const void *src, ws_dtype st, const ws_layout *sl)
{
    int64_t numel = ws_layout_numel(dl);
    if (numel != ws_layout_numel(sl) || dl->ndim != sl->ndim)
        return WS_ERR(WS_ERR_ARG, "copy_strided: layouts differ (%d-d with %lld elements vs "
                      "%d-d with %lld)", dl->ndim, (long long)numel, sl->ndim,
                      (long long)ws_layout_numel(sl));
    if (numel == 0) return WS_OK;
    strided_ctx c = {dst, src, dt, st, dl, sl, dl->ndim ? dl->shape[dl->ndim - 1] : 1};
    size_t rows = (size_t)(numel / c.inner);
    size_t row_bytes = (size_t)c.inner * (ws_dtype_size(dt) + ws_dtype_size(st));
    ws_parallel_for(rows, PAR_BYTES / 2 / row_bytes + 1, strided_rows, &c);
    return WS_OK;
}

/* ---- fill and random -------------------------------------------------------------- */

typedef struct {
    char *ptr;
    ws_dtype t;
    unsigned char pattern[8];
    uint64_t seed, first;
    float scale;
} fill_ctx;

static void fill_range(void *vctx, size_t begin, size_t end, int worker)
{
    fill_ctx *c = vctx;
    size_t es = ws_dtype_size(c->t);
    char *p = c->ptr + begin * es;
    size_t n = end - begin;
    if (es == 1) {
        memset(p, c->pattern[0], n);
        return;
    }
    /* Build a 4 KiB block by doubling, then stream copies of it: the
     * source stays in L1 and memcpy writes at full speed. */
    size_t bytes = n * es, done = es, block = 4096 / es * es;
    memcpy(p, c->pattern, es);
    while (done < bytes) {
        size_t k = done < block ? done : block;
        if (k > bytes - done) k = bytes - done;
        memcpy(p + done, p, k);
        done += k;
    }
}

static ws_status cpu_fill(ws_device *d, void *ptr, ws_dtype t, size_t count, double value)
{
    fill_ctx c = {.ptr = ptr, .t = t};
    ws_store_scalar(c.pattern, t, value);
    ws_parallel_for(count, PAR_BYTES / ws_dtype_size(t), fill_range, &c);
    return WS_OK;
}

static void random_range(void *vctx, size_t begin, size_t end, int worker)
{
    fill_ctx *c = vctx;
    size_t es = ws_dtype_size(c->t);
    float buf[256];
    for (size_t i = begin; i < end;) {
        size_t k = end - i < 256 ? end - i : 256;
        /* k >= 1 since i < end; cppcheck's value flow loses that. */
        // cppcheck-suppress knownConditionTrueFalse
        for (size_t j = 0; j < k; j++) buf[j] = ws_random_elem(c->seed, c->first + i + j, c->scale);
        ws_convert_host(c->ptr + i * es, c->t, buf, WS_F32, k);
        i += k;
    }
}

static ws_status cpu_random(ws_device *d, void *ptr, ws_dtype t, size_t count, uint64_t seed,
                            uint64_t first_index, float scale)
{
    fill_ctx c = {.ptr = ptr, .t = t, .seed = seed, .first = first_index, .scale = scale};
    ws_parallel_for(count, 1 << 16, random_range, &c);
    return WS_OK;
}

/* ---- checksum ------------------------------------------------------------------ */

#define HASH_PIECE ((int64_t)1 << 16) /* elements of a row one work unit hashes */

/* The hot loops of every verification, one per element size: each element's
 * hash depends only on its own bits and index (the key steps by
 * WS_HASH_KEY), so the loop vectorizes with no chain but the lane sums, and
 * contiguous data is hashed straight from memory. Cloned for AVX2 and
 * AVX-512 so hashing keeps up with memory. The loads go through memcpy: a
 * view may start at any element of its storage. */
#define HASH_LOOP(name, type, hash)                                           \
    WS_CLONES_V3_V4                                                           \
    static uint64_t name(const unsigned char *p, uint64_t first, int64_t n)   \
    {                                                                         \
        uint64_t acc = 0, key = first * WS_HASH_KEY;                          \
        for (int64_t j = 0; j < n; j++) {                                     \
            type v;                                                           \
            memcpy(&v, p + j * (int64_t)sizeof v, sizeof v);                  \
            acc += hash;                                                      \
            key += WS_HASH_KEY;                                               \
        }                                                                     \
        return acc;                                                           \
    }
/* Up to 32 bits, the first xor-shift folds into the key (ws_hash_tail). */
HASH_LOOP(hash_1, uint8_t, ws_hash_tail(v ^ key ^ (key >> 32)))
HASH_LOOP(hash_2, uint16_t, ws_hash_tail(v ^ key ^ (key >> 32)))
HASH_LOOP(hash_4, uint32_t, ws_hash_tail(v ^ key ^ (key >> 32)))
HASH_LOOP(hash_8, uint64_t, ws_hash_mix(v ^ key))
#undef HASH_LOOP

/* Sum of the hashes of n contiguous elements of `size` bytes, the first with
 * logical index `first`. */
static uint64_t hash_values(const unsigned char *p, size_t size, uint64_t first, int64_t n)
{
    switch (size) {
    case 1: return hash_1(p, first, n);
    case 2: return hash_2(p, first, n);
    case 4: return hash_4(p, first, n);
    default: return hash_8(p, first, n);
    }
}

typedef struct {
    const char *ptr;
    ws_dtype t, as;
    ws_layout l;    /* collapsed: a contiguous view is one row */
    int64_t pieces; /* work units per row */
    uint64_t first;
    uint64_t pitch; /* index step from one row to the next */
    uint64_t sum; /* added to atomically by each chunk */
} sum_ctx;

/* Elements [j0, j1) of one row (element stride `step`). Strided or converted
 * elements go through small buffers first; the rest is hashed in place. */
static uint64_t hash_segment(const sum_ctx *c, const unsigned char *row, int64_t step,
                             uint64_t first, int64_t j0, int64_t j1)
{
    size_t es = ws_dtype_size(c->t), as_size = ws_dtype_size(c->as);
    if (step == 1 && c->as == c->t)
        return hash_values(row + j0 * (int64_t)es, es, first + (uint64_t)j0, j1 - j0);
    unsigned char gather[256 * 8], conv[256 * 8];
    uint64_t acc = 0;
    for (int64_t j = j0; j < j1; j += 256) {
        int64_t k = j1 - j < 256 ? j1 - j : 256;
        const unsigned char *src = row + j * step * (int64_t)es;
        if (step != 1) {
            for (int64_t i = 0; i < k; i++)
                memcpy(gather + i * (int64_t)es, src + i * step * (int64_t)es, es);
            src = gather;
        }
        size_t vs = es;
        if (c->as != c->t) {
            ws_convert_host(conv, c->as, src, c->t, (size_t)k);
            src = conv;
            vs = as_size;
        }
        acc += hash_values(src, vs, first + (uint64_t)j, k);
    }
    return acc;
}

/* Work units u0..u1: piece u % pieces of row u / pieces. */
static void checksum_units(void *vctx, size_t u0, size_t u1, int worker)
{
    sum_ctx *c = vctx;
    size_t es = ws_dtype_size(c->t);
    int last = c->l.ndim - 1;
    int64_t inner = c->l.shape[last], step = c->l.strides[last];
    size_t pieces = (size_t)c->pieces;
    uint64_t acc = 0;
    row_iter it;
    row_iter_init(&it, &c->l, NULL, u0 / pieces);
    for (size_t u = u0; u < u1;) {
        size_t r = u / pieces, row_end = (r + 1) * pieces, stop = u1 < row_end ? u1 : row_end;
        int64_t j0 = (int64_t)(u - r * pieces) * HASH_PIECE;
        int64_t j1 = stop == row_end ? inner : (int64_t)(stop - r * pieces) * HASH_PIECE;
        const unsigned char *row = (const unsigned char *)c->ptr + it.doff * (int64_t)es;
        acc += hash_segment(c, row, step, c->first + (uint64_t)r * c->pitch, j0, j1);
        u = stop;
        if (u < u1) row_iter_next(&it, &c->l, NULL);
    }
    __atomic_add_fetch(&c->sum, acc, __ATOMIC_RELAXED);
}

/* Merges dims that are contiguous with each other and drops size-1 dims, so
 * the logical order is kept and a contiguous view becomes one long row that
 * the workers split into pieces. */
static void collapse_layout(ws_layout *out, const ws_layout *l)
{
    int n = 0;
    for (int k = 0; k < l->ndim; k++) {
        if (l->shape[k] == 1) continue;
        if (n > 0 && out->strides[n - 1] == l->strides[k] * l->shape[k]) {
            out->shape[n - 1] *= l->shape[k];
            out->strides[n - 1] = l->strides[k];
            continue;
        }
        out->shape[n] = l->shape[k];
        out->strides[n] = l->strides[k];
        n++;
    }
    if (n == 0) { /* a scalar, or every dim is 1 */
        out->shape[0] = 1;
        out->strides[0] = 1;
        n = 1;
    }
    out->ndim = n;
}

static ws_status cpu_checksum(ws_device *d, const void *ptr, ws_dtype t, const ws_layout *l,
                              uint64_t first_index, ws_dtype as, uint64_t *out)
{
    int64_t numel = ws_layout_numel(l);
    *out = 0;
    if (numel == 0) return WS_OK;
    sum_ctx c = {.ptr = ptr, .t = t, .as = as, .first = first_index};
    collapse_layout(&c.l, l);
    int64_t inner = c.l.shape[c.l.ndim - 1];
    c.pitch = (uint64_t)inner;
    c.pieces = (inner + HASH_PIECE - 1) / HASH_PIECE;
    size_t units = (size_t)(numel / inner) * (size_t)c.pieces;
    size_t unit_bytes = (size_t)(inner < HASH_PIECE ? inner : HASH_PIECE) * ws_dtype_size(t);
    ws_parallel_for(units, PAR_BYTES / unit_bytes + 1, checksum_units, &c);
    *out = c.sum;
    return WS_OK;
}

static ws_status cpu_checksum_rows(ws_device *d, const void *ptr, ws_dtype t, int64_t rows,
                                   int64_t cols, uint64_t first_index, uint64_t pitch,
                                   ws_dtype as, uint64_t *out)
{
    (void)d;
    *out = 0;
    if (rows <= 0 || cols <= 0) return WS_OK;
    /* Not collapsed: the rows keep their own first indices. */
    sum_ctx c = {.ptr = ptr, .t = t, .as = as, .first = first_index, .pitch = pitch};
    c.l.ndim = 2;
    c.l.shape[0] = rows;
    c.l.shape[1] = cols;
    c.l.strides[0] = cols;
    c.l.strides[1] = 1;
    c.pieces = (cols + HASH_PIECE - 1) / HASH_PIECE;
    size_t units = (size_t)rows * (size_t)c.pieces;
    size_t unit_bytes = (size_t)(cols < HASH_PIECE ? cols : HASH_PIECE) * ws_dtype_size(t);
    ws_parallel_for(units, PAR_BYTES / unit_bytes + 1, checksum_units, &c);
    *out = c.sum;
    return WS_OK;
}

/* ---- sync, memory info, events --------------------------------------------------------- */

static ws_status cpu_synchronize(ws_device *d) { return WS_OK; }

static ws_status cpu_mem_info(ws_device *d, size_t *free_bytes, size_t *total_bytes)
{
    unsigned long long total_kb = 0, avail_kb = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f)) {
            unsigned long long v;
            if (sscanf(line, "MemTotal: %llu kB", &v) == 1) total_kb = v;
            else if (sscanf(line, "MemAvailable: %llu kB", &v) == 1) avail_kb = v;
        }
        fclose(f);
    }
    if (!total_kb) {
        /* No procfs (a container without /proc): ask libc instead. */
        long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
        total_kb = pages > 0 ? (unsigned long long)pages * page_size() / 1024 : 0;
        avail_kb = avail > 0 ? (unsigned long long)avail * page_size() / 1024 : 0;
    }
    *total_bytes = (size_t)(total_kb * 1024);
    *free_bytes = (size_t)(avail_kb * 1024);
    return WS_OK;
}

static ws_status cpu_event_create(ws_device *d, ws_event **out)
{
    *out = ws_calloc(1, sizeof **out);
    if (!*out) return WS_ERR(WS_ERR_NOMEM, "cpu: out of memory creating an event");
    return WS_OK;
}

static ws_status cpu_event_record(ws_device *d, ws_event *e)
{
    clock_gettime(CLOCK_MONOTONIC, &e->ts);
    return WS_OK;
}

static ws_status cpu_event_elapsed_ms(ws_device *d, ws_event *start, ws_event *end, double *ms)
{
    *ms = (double)(end->ts.tv_sec - start->ts.tv_sec) * 1e3 +
          (double)(end->ts.tv_nsec - start->ts.tv_nsec) / 1e6;
    return WS_OK;
}

static void cpu_event_destroy(ws_device *d, ws_event *e) { free(e); }

/* ---- virtual memory for pools ------------------------------------------------------ */

static size_t cpu_vm_granularity(ws_device *d) { return page_size(); }

/* The reservation is PROT_NONE without MAP_NORESERVE: it commits nothing
 * yet, but the kernel then charges the pages when vm_map makes them
 * writable and applies its overcommit rule there, the rule a plain
 * allocation (cpu_alloc) meets in mmap. A pool larger than memory thus fails
 * to map with ENOMEM instead of being accepted and ended by the OOM killer
 * when its pages are touched. vm_unmap's PROT_NONE gives the charge back. */
static ws_status cpu_vm_reserve(ws_device *d, size_t bytes, void **va)
{
    *va = NULL;
    void *p = map_huge_aligned(bytes, PROT_NONE);
    if (p == MAP_FAILED) {
        char h[32];
        ws_format_bytes(h, sizeof h, bytes);
        return WS_ERR(WS_ERR_NOMEM, "cpu: cannot reserve %s of address space for a pool: %s",
                      h, strerror(errno));
    }
    *va = p;
    return WS_OK;
}

static ws_status cpu_vm_map(ws_device *d, void *va, size_t bytes)
{
    /* Pages of a private anonymous mapping read as zero until written, and
     * MADV_DONTNEED in vm_unmap dropped the old ones: these are fresh. */
    if (mprotect(va, bytes, PROT_READ | PROT_WRITE) != 0) {
        char h[32];
        ws_format_bytes(h, sizeof h, bytes);
        return WS_ERR(WS_ERR_NOMEM, "cpu: out of memory mapping %s (%zu bytes) of pool memory: "
                      "%s; the system cannot back that much, use a smaller pool", h, bytes,
                      strerror(errno));
    }
    return WS_OK;
}

static ws_status cpu_vm_unmap(ws_device *d, void *va, size_t bytes)
{
    if (madvise(va, bytes, MADV_DONTNEED) != 0 || mprotect(va, bytes, PROT_NONE) != 0)
        return WS_ERR(WS_ERR_DEVICE, "cpu: cannot unmap pool memory at %p: %s", va,
                      strerror(errno));
    return WS_OK;
}

static void cpu_vm_populate(ws_device *d, void *va, size_t bytes) { populate(va, bytes); }

static void cpu_vm_release(ws_device *d, void *va, size_t bytes)
{
    if (va) munmap(va, bytes);
}

static const ws_device_ops cpu_ops = {
    .kind_name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_free,
    .copy = cpu_copy,
    .copy_batch = cpu_copy_batch,
    .copy_strided = cpu_copy_strided,
    .fill = cpu_fill,
    .random = cpu_random,
    .checksum = cpu_checksum,
    .checksum_rows = cpu_checksum_rows,
    .quantize_fp8_block = ws_cpu_quantize_fp8_block,
    .synchronize = cpu_synchronize,
    .mem_info = cpu_mem_info,
    .event_create = cpu_event_create,
    .event_record = cpu_event_record,
    .event_elapsed_ms = cpu_event_elapsed_ms,
    .event_destroy = cpu_event_destroy,
    .vm_granularity = cpu_vm_granularity,
    .vm_reserve = cpu_vm_reserve,
    .vm_map = cpu_vm_map,
    .vm_unmap = cpu_vm_unmap,
    .vm_populate = cpu_vm_populate,
    .vm_release = cpu_vm_release,
};

const ws_device_ops *ws_cpu_ops(void) { return &cpu_ops; }
