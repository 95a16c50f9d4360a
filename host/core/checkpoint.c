/* checkpoint.c: opening a checkpoint by path (one file, or shards named by an
 * index) and looking tensors up by name across all of its files. */
#include "checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fault.h"
#include "parallel.h"

struct ws_ckpt {
    char *path;
    ws_st_index *index;  /* NULL: a single file */
    ws_st_file **files;
    size_t n_files;
    char **file_names;
    const ws_st_entry **entries; /* per tensor, in index (or file) order */
    size_t *file_of;
    size_t n;
};

void ws_ckpt_free(ws_ckpt *c)
{
    if (!c) return;
    for (size_t j = 0; j < c->n_files; j++) {
        ws_st_unref(c->files[j]);
        free(c->file_names[j]);
    }
    free(c->files);
    free(c->file_names);
    free(c->entries);
    free(c->file_of);
    ws_st_index_free(c->index);
    free(c->path);
    free(c);
}

const char *ws_ckpt_path(const ws_ckpt *c) { return c->path; }
size_t ws_ckpt_count(const ws_ckpt *c) { return c->n; }

const char *ws_ckpt_name(const ws_ckpt *c, size_t i)
{
    return i < c->n ? c->entries[i]->name : NULL;
}

const ws_st_entry *ws_ckpt_entry(const ws_ckpt *c, size_t i, size_t *file)
{
    if (i >= c->n) return NULL;
    if (file) *file = c->file_of[i];
    return c->entries[i];
}

const ws_st_entry *ws_ckpt_find(const ws_ckpt *c, const char *name, size_t *file)
{
    if (c->index) {
        size_t i;
        return ws_st_index_find(c->index, name, &i) ? ws_ckpt_entry(c, i, file) : NULL;
    }
    if (file) *file = 0;
    return c->n_files ? ws_st_find(c->files[0], name) : NULL;
}

size_t ws_ckpt_file_count(const ws_ckpt *c) { return c->n_files; }

const char *ws_ckpt_file_name(const ws_ckpt *c, size_t j)
{
    return j < c->n_files ? c->file_names[j] : NULL;
}

ws_st_file *ws_ckpt_file(const ws_ckpt *c, size_t j) { return j < c->n_files ? c->files[j] : NULL; }

size_t ws_ckpt_metadata_count(const ws_ckpt *c)
{
    return c->index ? ws_st_index_metadata_count(c->index) : ws_st_metadata_count(c->files[0]);
}

const char *ws_ckpt_metadata_key(const ws_ckpt *c, size_t i)
{
    return c->index ? ws_st_index_metadata_key(c->index, i) : ws_st_metadata_key(c->files[0], i);
}

const char *ws_ckpt_metadata_value(const ws_ckpt *c, size_t i)
{
    return c->index ? ws_st_index_metadata_value(c->index, i)
                    : ws_st_metadata_value(c->files[0], i);
}

ws_status ws_ckpt_tensor(const ws_ckpt *c, const char *name, ws_tensor *out)
{
    memset(out, 0, sizeof *out);
    size_t j;
    const ws_st_entry *e = ws_ckpt_find(c, name, &j);
    if (!e)
        return WS_ERR(WS_ERR_ARG, "safetensors checkpoint '%s' has no tensor '%s'", c->path, name);
    return ws_st_tensor(c->files[j], e, out);
}

/* ---- opening ------------------------------------------------------------------------ */

static char *join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = ws_malloc(a + b + 2);
    if (p) snprintf(p, a + b + 2, "%s/%s", dir, name);
    return p;
}

static int is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static ws_status alloc_tables(ws_ckpt *c, size_t n_files, size_t n)
{
    c->files = ws_calloc(n_files ? n_files : 1, sizeof *c->files);
    c->file_names = ws_calloc(n_files ? n_files : 1, sizeof *c->file_names);
    c->entries = ws_calloc(n ? n : 1, sizeof *c->entries);
    c->file_of = ws_calloc(n ? n : 1, sizeof *c->file_of);
    if (!c->files || !c->file_names || !c->entries || !c->file_of)
        return WS_ERR(WS_ERR_NOMEM, "safetensors checkpoint '%s': out of memory", c->path);
    return WS_OK;
}

static ws_status open_single(ws_ckpt *c, const char *file)
{
    ws_st_file *f;
    WS_TRY(ws_st_open(file, &f));
    ws_status rc = alloc_tables(c, 1, ws_st_count(f));
    const char *slash = strrchr(file, '/');
    char *base = rc == WS_OK ? ws_strdup(slash ? slash + 1 : file) : NULL;
    if (rc == WS_OK && !base)
        rc = WS_ERR(WS_ERR_NOMEM, "safetensors checkpoint '%s': out of memory", c->path);
    if (rc != WS_OK) {
        ws_st_unref(f);
        return rc;
    }
    c->files[0] = f;
    c->file_names[0] = base;
    c->n_files = 1;
    c->n = ws_st_count(f);
    for (size_t i = 0; i < c->n; i++) c->entries[i] = ws_st_entry_at(f, i);
    return WS_OK;
}

/* Reads a whole (bounded) file into memory of its own. */
static ws_status read_text(const char *path, char **text, size_t *len)
{
    *text = NULL;
    /* O_NONBLOCK: a FIFO by that name must not hang the open; it is then
     * refused as not a regular file. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    FILE *fp = fd >= 0 ? fdopen(fd, "rb") : NULL;
    if (!fp) {
        int err = errno;
        if (fd >= 0) close(fd);
        return WS_ERR(WS_ERR_IO, "safetensors index '%s': cannot open: %s", path, strerror(err));
    }
    struct stat st;
    ws_status rc = WS_OK;
    if (fstat(fileno(fp), &st) != 0)
        rc = WS_ERR(WS_ERR_IO, "safetensors index '%s': cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        rc = WS_ERR(WS_ERR_IO, "safetensors index '%s': not a regular file", path);
    else if ((uint64_t)st.st_size > WS_CKPT_MAX_INDEX_BYTES)
        rc = WS_ERR(WS_ERR_FORMAT, "safetensors index '%s': %lld bytes is above the limit of %zu",
                    path, (long long)st.st_size, WS_CKPT_MAX_INDEX_BYTES);
    else if (!(*text = ws_malloc((size_t)st.st_size + 1)))
        rc = WS_ERR(WS_ERR_NOMEM, "safetensors index '%s': out of memory", path);
    else if ((*len = fread(*text, 1, (size_t)st.st_size, fp)) != (size_t)st.st_size || ferror(fp))
        rc = WS_ERR(WS_ERR_IO, "safetensors index '%s': read failed", path);
    fclose(fp);
    if (rc != WS_OK) {
        free(*text);
        *text = NULL;
    }
    return rc;
}

/* The first tensor the index lists in shard j, for messages. */
static const char *first_in_shard(const ws_st_index *x, size_t j)
{
    for (size_t i = 0; i < ws_st_index_count(x); i++)
        if (ws_st_index_file_of(x, i) == j) return ws_st_index_name(x, i);
    return "?";
}

static ws_status open_index(ws_ckpt *c, const char *index_path, const char *dir)
{
    char *text;
    size_t len = 0;
    WS_TRY(read_text(index_path, &text, &len));
    ws_status rc = ws_st_index_parse(text, len, index_path, &c->index);
    free(text);
    WS_TRY(rc);
    const ws_st_index *x = c->index;
    WS_TRY(alloc_tables(c, ws_st_index_file_count(x), ws_st_index_count(x)));
    for (size_t j = 0; j < ws_st_index_file_count(x); j++) {
        const char *name = ws_st_index_file(x, j);
        char *path = join(dir, name);
        if (!path || !(c->file_names[j] = ws_strdup(name))) {
            free(path);
            return WS_ERR(WS_ERR_NOMEM, "safetensors checkpoint '%s': out of memory", c->path);
        }
        rc = ws_st_open(path, &c->files[j]);
        free(path);
        c->n_files = j + 1; /* the name (and the file, once open) are freed with c */
        if (rc != WS_OK) {
            ws_errprefix("safetensors checkpoint '%s': shard '%s' (listed in the index for "
                         "tensor '%s')", index_path, name, first_in_shard(x, j));
            return rc;
        }
    }
    for (size_t i = 0; i < ws_st_index_count(x); i++) {
        size_t j = ws_st_index_file_of(x, i);
        const char *name = ws_st_index_name(x, i);
        const ws_st_entry *e = ws_st_find(c->files[j], name);
        if (!e)
            return WS_ERR(WS_ERR_FORMAT, "safetensors checkpoint '%s': tensor '%s' is listed "
                          "in the index for shard '%s', which does not hold it", index_path,
                          name, c->file_names[j]);
        c->entries[i] = e;
        c->file_of[i] = j;
    }
    c->n = ws_st_index_count(x);
    return WS_OK;
}

static ws_status open_path(ws_ckpt *c, const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return WS_ERR(WS_ERR_IO, "safetensors checkpoint '%s': cannot open: %s", path,
                      strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        size_t n = strlen(path);
        if (n >= 5 && strcmp(path + n - 5, ".json") == 0) {
            const char *slash = strrchr(path, '/');
            if (!slash) return open_index(c, path, ".");
            char *dir = ws_strdup(path);
            if (!dir) return WS_ERR(WS_ERR_NOMEM, "safetensors checkpoint '%s': out of memory", path);
            size_t cut = slash == path ? 1 : (size_t)(slash - path); /* "/x.json": in "/" */
            dir[cut] = '\0';
            ws_status rc = open_index(c, path, dir);
            free(dir);
            return rc;
        }
        return open_single(c, path);
    }
    char *index = join(path, "model.safetensors.index.json");
    char *single = join(path, "model.safetensors");
    ws_status rc;
    if (!index || !single)
        rc = WS_ERR(WS_ERR_NOMEM, "safetensors checkpoint '%s': out of memory", path);
    else if (is_file(index))
        rc = open_index(c, index, path);
    else if (is_file(single))
        rc = open_single(c, single);
    else
        rc = WS_ERR(WS_ERR_IO, "safetensors checkpoint '%s': the directory holds neither "
                    "model.safetensors.index.json nor model.safetensors", path);
    free(index);
    free(single);
    return rc;
}

ws_status ws_ckpt_open(const char *path, ws_ckpt **out)
{
    *out = NULL;
    ws_ckpt *c = ws_calloc(1, sizeof *c);
    if (!c || !(c->path = ws_strdup(path))) {
        free(c);
        return WS_ERR(WS_ERR_NOMEM, "safetensors checkpoint '%s': out of memory", path);
    }
    ws_status rc = open_path(c, path);
    if (rc != WS_OK) {
        ws_ckpt_free(c);
        return rc;
    }
    *out = c;
    return WS_OK;
}

/* Asks the kernel to map [p, p + n) of a file mapping now. Advice only: a
 * kernel without it still faults the pages in during the copy. */
static void prefault(const char *p, size_t n)
{
    static long page;
    if (n == 0) return;
    if (!page) page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p & ~((uintptr_t)page - 1), b = (uintptr_t)p + n;
#ifdef MADV_POPULATE_READ
    if (madvise((void *)a, b - a, MADV_POPULATE_READ) == 0) return;
#endif
    madvise((void *)a, b - a, MADV_WILLNEED);
}

/* Byte ranges laid end to end as one run of `total` bytes, which
 * ws_parallel_for splits over the cpu workers. A range is either faulted in
 * (prefault: fd < 0) or read with pread from fd at off into dst. */
typedef struct byte_range {
    const char *src; /* the mapped bytes */
    char *dst;       /* pread destination; NULL: prefault only */
    int fd;
    uint64_t off;
    size_t len, start; /* start: bytes of the ranges before this one */
} byte_range;

typedef struct range_job {
    const byte_range *r;
    size_t n;
    int failed; /* errno of the first failed read */
} range_job;

static void run_ranges(void *ctx, size_t begin, size_t end, int worker)
{
    (void)worker;
    range_job *j = ctx;
    size_t lo = 0, hi = j->n; /* the first range that ends after `begin` */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (j->r[mid].start + j->r[mid].len <= begin) lo = mid + 1;
        else hi = mid;
    }
    for (size_t i = lo; i < j->n && j->r[i].start < end; i++) {
        const byte_range *r = &j->r[i];
        size_t a = begin > r->start ? begin - r->start : 0;
        size_t b = end - r->start < r->len ? end - r->start : r->len;
        if (!r->dst) {
            if (b > a) prefault(r->src + a, b - a);
            continue;
        }
        while (a < b) {
            ssize_t got = pread(r->fd, r->dst + a, b - a, (off_t)(r->off + a));
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                __atomic_store_n(&j->failed, got < 0 ? errno : EIO, __ATOMIC_RELAXED);
                break;
            }
            a += (size_t)got;
        }
    }
}

/* Runs ranges [0, n) over the workers; the chunk keeps one worker on one
 * range long enough for the kernel's read-ahead and page walk to pay off. */
static int run_all(const byte_range *r, size_t n)
{
    size_t total = n ? r[n - 1].start + r[n - 1].len : 0;
    range_job job = {r, n, 0};
    ws_parallel_for(total, (size_t)32 << 20, run_ranges, &job);
    return job.failed;
}

ws_status ws_ckpt_read_rows(const ws_ckpt *c, size_t n, const char *const *names,
                            const int64_t *first, ws_tensor *const *dsts)
{
    size_t m = n ? n : 1;
    ws_tensor *srcs = ws_calloc(m, sizeof *srcs);
    ws_tensor **cd = ws_calloc(m, sizeof *cd);      /* copied: destinations */
    ws_tensor **wd = ws_calloc(m, sizeof *wd);      /* read straight into */
    const ws_tensor **cs = ws_calloc(m, sizeof *cs); /* and their sources */
    byte_range *rd = ws_calloc(m, sizeof *rd), *pf = ws_calloc(m, sizeof *pf);
    ws_status rc = srcs && cd && wd && cs && rd && pf
                       ? WS_OK
                       : WS_ERR(WS_ERR_NOMEM, "checkpoint '%s': reading %zu tensors", c->path, n);
    size_t n_rd = 0, n_cp = 0, rd_bytes = 0, pf_bytes = 0;
    for (size_t i = 0; i < n && rc == WS_OK; i++) {
        ws_tensor full = {0}, flat = {0};
        size_t file = 0;
        const ws_st_entry *e = ws_ckpt_find(c, names[i], &file);
        rc = ws_ckpt_tensor(c, names[i], &full);
        int64_t numel = rc == WS_OK ? ws_tensor_numel(&full) : 0, want = ws_tensor_numel(dsts[i]);
        if (rc == WS_OK && (first[i] < 0 || first[i] > numel || want > numel - first[i]))
            rc = WS_ERR(WS_ERR_ARG, "checkpoint '%s': tensor '%s' has %lld elements; %lld "
                        "elements from element %lld are outside it", c->path, names[i],
                        (long long)numel, (long long)want, (long long)first[i]);
        if (rc == WS_OK) rc = ws_tensor_reshape(&flat, &full, 1, &numel);
        if (rc == WS_OK) rc = ws_tensor_narrow(&srcs[i], &flat, 0, first[i], want);
        ws_tensor_free(&flat);
        ws_tensor_free(&full);
        void *sp = NULL, *dp = NULL;
        if (rc == WS_OK) rc = ws_tensor_access(&srcs[i], WS_ACCESS_READ, names[i], &sp);
        if (rc != WS_OK) break;
        size_t len = ws_tensor_nbytes(&srcs[i]);
        uint64_t data_off = 0;
        int fd = ws_st_fd(ws_ckpt_file(c, file), &data_off);
        /* Same dtype into host memory: pread straight into the destination,
         * the one copy reading the file costs anyway. */
        int direct = fd >= 0 && dsts[i]->dtype == e->dtype && ws_tensor_is_contiguous(dsts[i]) &&
                     ws_tensor_device(dsts[i])->kind == WS_DEVICE_CPU;
        if (direct) rc = ws_tensor_access(dsts[i], WS_ACCESS_WRITE, "read_rows", &dp);
        if (rc != WS_OK) break;
        if (direct) {
            rd[n_rd] = (byte_range){sp, dp, fd,
                                    data_off + e->begin + (uint64_t)first[i] * ws_dtype_size(e->dtype),
                                    len, rd_bytes};
            rd_bytes += len;
            wd[n_rd++] = dsts[i];
        } else {
            pf[n_cp] = (byte_range){sp, NULL, -1, 0, len, pf_bytes};
            pf_bytes += len;
            cd[n_cp] = dsts[i];
            cs[n_cp] = &srcs[i];
            n_cp++;
        }
    }
    if (rc == WS_OK) {
        int err = run_all(rd, n_rd);
        if (err) rc = WS_ERR(WS_ERR_IO, "checkpoint '%s': reading: %s", c->path, strerror(err));
        /* The reads went around the tensor API: record what they wrote. */
        for (size_t i = 0; i < n_rd && rc == WS_OK; i++) ws_tensor_mark_written(wd[i]);
    }
    if (rc == WS_OK && n_cp) {
        run_all(pf, n_cp);
        /* A batched copy runs on one device; the sources are host memory,
         * so device destinations take a copy each (host to device). */
        int on_cpu = 1;
        for (size_t i = 0; i < n_cp; i++)
            if (ws_tensor_device(cd[i])->kind != WS_DEVICE_CPU) on_cpu = 0;
        if (on_cpu) rc = ws_copy_many(cd, cs, n_cp);
        for (size_t i = 0; !on_cpu && i < n_cp && rc == WS_OK; i++)
            rc = ws_tensor_copy(cd[i], cs[i]);
    }
    for (size_t i = 0; srcs && i < n; i++) ws_tensor_free(&srcs[i]);
    free(srcs);
    free(cd);
    free(wd);
    free(cs);
    free(rd);
    free(pf);
    return rc;
}
