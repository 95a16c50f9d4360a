/* safetensors_write.c: safetensors files and sharded checkpoints, written
 * atomically (see safetensors_write.h).
 *
 * A save first checks every argument (names, tensors, metadata), so misuse
 * fails before the file system is touched. Each file then goes to a hidden
 * temporary name beside its target and is renamed over it once its bytes are
 * on disk: a reader of the target sees the old file or the new one, never a
 * torn one. Device tensors reach the file through one staging buffer of
 * bounded size, so the host never holds more than that of a model. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "fault.h"
#include "safetensors_write.h"

/* Readers (the reference implementation among them) refuse larger headers. */
#define ST_MAX_HEADER_BYTES 100000000u

/* The longest file name (one path component) the file systems we write to take. */
#ifdef NAME_MAX
#define ST_NAME_MAX NAME_MAX
#else
#define ST_NAME_MAX 255
#endif
/* What the temporary name adds to a target's: "." before it, ".tmp.XXXXXX" after. */
#define ST_TMP_EXTRA 12

/* The start of a long string for messages: "pppp...pppp..." (40 bytes) */
#define ST_ABBREV_FMT "%.*s%s"
#define ST_ABBREV(s) (strlen(s) > 48 ? 40 : (int)strlen(s)), (s), (strlen(s) > 48 ? "..." : "")

static const char *st_dtype_name(ws_dtype d)
{
    static const char *const names[WS_DTYPE_COUNT] = {
        [WS_F32] = "F32", [WS_BF16] = "BF16", [WS_F16] = "F16", [WS_FP8E4M3] = "F8_E4M3",
        [WS_U8] = "U8",   [WS_I32] = "I32",   [WS_I64] = "I64"};
    return (unsigned)d < WS_DTYPE_COUNT ? names[d] : NULL;
}

/* ---- argument checks --------------------------------------------------------------- */

/* JSON text must be UTF-8; a name that is not would make the header unreadable. */
static int valid_utf8(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p++;
        int more;
        unsigned min;
        if (c < 0x80) continue;
        if ((c & 0xE0) == 0xC0) {
            more = 1;
            min = 0x80;
            c &= 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            more = 2;
            min = 0x800;
            c &= 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            more = 3;
            min = 0x10000;
            c &= 0x07;
        } else {
            return 0; /* a continuation byte first, or no UTF-8 lead byte at all */
        }
        for (int i = 0; i < more; i++, p++) {
            if ((*p & 0xC0) != 0x80) return 0;
            c = (c << 6) | (*p & 0x3F);
        }
        if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
    }
    return 1;
}

typedef struct named { const char *name; size_t index; } named;

static int cmp_named(const void *a, const void *b)
{
    const named *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : (x->index > y->index) - (x->index < y->index);
}

/* Finds a name given twice among n (stride apart in `list`): sorting keeps
 * this n log n for models of a hundred thousand tensors. */
static ws_status check_unique(const char *what, const char *kind, const char *const *list,
                              size_t n, size_t stride)
{
    if (n < 2) return WS_OK;
    named *v = ws_malloc(n * sizeof *v);
    if (!v) return WS_ERR(WS_ERR_NOMEM, "%s: out of memory checking %zu %ss", what, n, kind);
    for (size_t i = 0; i < n; i++) v[i] = (named){list[i * stride], i};
    qsort(v, n, sizeof *v, cmp_named);
    ws_status rc = WS_OK;
    for (size_t i = 1; i < n && rc == WS_OK; i++)
        if (strcmp(v[i - 1].name, v[i].name) == 0)
            rc = WS_ERR(WS_ERR_ARG, "%s: %s '%s' is given twice (items %zu and %zu); they "
                        "must be unique",
                        what, kind, v[i].name, v[i - 1].index + 1, v[i].index + 1);
    free(v);
    return rc;
}

/* Totals gathered while checking, for the staging buffer and progress. */
typedef struct st_sizes {
    uint64_t total;          /* tensor bytes */
    size_t max_device_bytes; /* the largest tensor not in host memory */
} st_sizes;

static ws_status check_args(const char *what, size_t n, const char *const *names,
                            const ws_tensor *const *tensors, size_t n_meta,
                            const char *const *meta_kv, st_sizes *sz)
{
    memset(sz, 0, sizeof *sz);
    if (n && (!names || !tensors))
        return WS_ERR(WS_ERR_ARG, "%s: %zu tensors but no %s array", what, n,
                      names ? "tensor" : "name");
    if (n_meta && !meta_kv)
        return WS_ERR(WS_ERR_ARG, "%s: %zu metadata entries but no array", what, n_meta);
    for (size_t i = 0; i < n; i++) {
        const char *name = names[i];
        if (!name || !*name)
            return WS_ERR(WS_ERR_ARG, "%s: tensor %zu has %s name; give every tensor a name",
                          what, i + 1, name ? "an empty" : "no");
        if (strcmp(name, "__metadata__") == 0)
            return WS_ERR(WS_ERR_ARG, "%s: tensor %zu is named '__metadata__', which the format "
                          "reserves for metadata; rename it", what, i + 1);
        if (!valid_utf8(name))
            return WS_ERR(WS_ERR_ARG, "%s: the name of tensor %zu is not valid UTF-8", what, i + 1);
        const ws_tensor *t = tensors[i];
        char ctx[300], lb[200], ty[160];
        snprintf(ctx, sizeof ctx, "%s (tensor %zu, '%s')", what, i + 1, name);
        WS_TRY(ws_tensor_check_readable(t, ctx));
        if (!st_dtype_name(t->dtype))
            return WS_ERR(WS_ERR_ARG, "%s: unknown dtype %d", ctx, (int)t->dtype);
        if (!ws_tensor_is_contiguous(t))
            return WS_ERR(WS_ERR_ARG, "%s: tensor %s %s is not contiguous; safetensors stores "
                          "dense row-major data, so copy it into a contiguous tensor first",
                          ctx, ws_tensor_label(t, lb, sizeof lb),
                          ws_tensor_typestr(t, ty, sizeof ty));
        size_t bytes = ws_tensor_nbytes(t);
        sz->total += bytes;
        if (ws_tensor_device(t)->kind != WS_DEVICE_CPU && bytes > sz->max_device_bytes)
            sz->max_device_bytes = bytes;
    }
    for (size_t i = 0; i < 2 * n_meta; i++) {
        const char *s = meta_kv[i];
        const char *part = i % 2 ? "value" : "key";
        if (!s)
            return WS_ERR(WS_ERR_ARG, "%s: metadata entry %zu has no %s", what, i / 2 + 1, part);
        if (!valid_utf8(s))
            return WS_ERR(WS_ERR_ARG, "%s: metadata %s %zu is not valid UTF-8", what, part,
                          i / 2 + 1);
    }
    WS_TRY(check_unique(what, "tensor name", names, n, 1));
    return check_unique(what, "metadata key", meta_kv, n_meta, 2);
}

/* ---- files written atomically ------------------------------------------------------ */

typedef struct st_file {
    int fd;
    const char *path;
    char *tmp; /* "<dir>/.<name>.tmp.XXXXXX", allocated */
    char *dir; /* allocated */
} st_file;

static ws_status io_error(const char *what, const char *path, const char *doing, const char *obj,
                          int err)
{
    return WS_ERR(WS_ERR_IO, "%s: writing '%s': %s%s%s%s: %s", what, path, doing,
                  obj ? " '" : "", obj ? obj : "", obj ? "'" : "", strerror(err));
}

/* The process's umask, read once. umask() can only be read by setting it,
 * which races with any other thread creating a file meanwhile; Linux shows it
 * in /proc/self/status (since 4.7), so the set-and-restore is a fallback. */
static mode_t st_umask = 022;
static pthread_once_t st_umask_once = PTHREAD_ONCE_INIT;

static void read_umask(void)
{
    FILE *f = fopen("/proc/self/status", "re");
    int found = 0;
    if (f) {
        char line[256];
        unsigned m;
        while (!found && fgets(line, sizeof line, f))
            if (sscanf(line, "Umask: %o", &m) == 1) {
                st_umask = (mode_t)(m & 0777);
                found = 1;
            }
        fclose(f);
    }
    if (!found) {
        mode_t m = umask(022);
        umask(m);
        st_umask = m;
    }
}

/* Splits `path` into its directory and a unique temporary name beside it.
 * The name is unique (mkostemp, O_EXCL) so two writers of one target, a
 * nested save from a progress callback among them, never share an inode.
 * A target name near the limit has its temporary's copy cut short. */
static ws_status temp_name(st_file *f, const char *what, const char *path)
{
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return WS_ERR(WS_ERR_ARG, "%s: path '%s' names no file", what, path);
    size_t blen = strlen(base);
    if (blen > ST_NAME_MAX)
        return WS_ERR(WS_ERR_ARG, "%s: file name '" ST_ABBREV_FMT "' is too long (%zu bytes, "
                      "over the %d a file name may have); use a shorter name",
                      what, ST_ABBREV(base), blen, ST_NAME_MAX);
    size_t dlen = slash ? (size_t)(slash - path) : 1;
    if (slash == path) dlen = 1; /* "/x": the root */
    size_t keep = blen < ST_NAME_MAX - ST_TMP_EXTRA ? blen : ST_NAME_MAX - ST_TMP_EXTRA;
    f->dir = ws_malloc(dlen + 1);
    f->tmp = ws_malloc(dlen + keep + ST_TMP_EXTRA + 2);
    if (!f->dir || !f->tmp)
        return WS_ERR(WS_ERR_NOMEM, "%s: writing '%s': out of memory", what, path);
    memcpy(f->dir, slash ? path : ".", dlen);
    f->dir[dlen] = '\0';
    snprintf(f->tmp, dlen + keep + ST_TMP_EXTRA + 2, "%s/.%.*s.tmp.XXXXXX", f->dir, (int)keep,
             base);
    return WS_OK;
}

static ws_status file_open(st_file *f, const char *what, const char *path)
{
    f->fd = -1;
    f->path = path;
    f->tmp = f->dir = NULL;
    WS_TRY(temp_name(f, what, path));
    f->fd = mkostemp(f->tmp, O_CLOEXEC);
    if (f->fd < 0) {
        int err = errno;
        struct stat st;
        if (err == ENOENT && stat(f->dir, &st) != 0)
            return WS_ERR(WS_ERR_IO, "%s: writing '%s': directory '%s' does not exist: %s; "
                          "create it first", what, path, f->dir, strerror(err));
        return io_error(what, path, "cannot create the temporary file", f->tmp, err);
    }
    /* mkostemp creates 0600; the file gets the mode a plain create would give. */
    pthread_once(&st_umask_once, read_umask);
    if (fchmod(f->fd, 0666 & ~st_umask) != 0) {
        int err = errno;
        close(f->fd);
        f->fd = -1;
        unlink(f->tmp);
        return io_error(what, path, "setting the mode of the temporary file", f->tmp, err);
    }
    return WS_OK;
}

/* Removes what a failed write left (the target is untouched) and frees the
 * names; after a commit only the names. */
static void file_abort(st_file *f)
{
    if (f->fd >= 0) {
        close(f->fd);
        unlink(f->tmp);
        f->fd = -1;
    }
    free(f->tmp);
    free(f->dir);
    f->tmp = f->dir = NULL;
}

static ws_status file_write(st_file *f, const char *what, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t k = write(f->fd, p, len > ((size_t)1 << 30) ? (size_t)1 << 30 : len);
        if (k < 0) {
            if (errno == EINTR) continue;
            return io_error(what, f->path, "writing", f->tmp, errno);
        }
        p += k;
        len -= (size_t)k;
    }
    return WS_OK;
}

/* Data on disk, then the name: a crash leaves the old target or the new
 * one. The directory's own fsync makes the rename durable; file systems
 * that cannot sync a directory are no reason to fail a complete save. */
static ws_status file_commit(st_file *f, const char *what)
{
    if (fsync(f->fd) != 0) return io_error(what, f->path, "flushing", f->tmp, errno);
    int fd = f->fd;
    f->fd = -1;
    if (close(fd) != 0) {
        int err = errno;
        unlink(f->tmp);
        return io_error(what, f->path, "closing", f->tmp, err);
    }
    if (rename(f->tmp, f->path) != 0) {
        int err = errno;
        unlink(f->tmp);
        return io_error(what, f->path, "renaming the temporary file", f->tmp, err);
    }
    int dfd = open(f->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    return WS_OK;
}

static ws_status write_text_file(const char *what, const char *path, const char *text)
{
    st_file f;
    ws_status rc = file_open(&f, what, path);
    if (rc == WS_OK) rc = file_write(&f, what, text, strlen(text));
    if (rc == WS_OK) rc = file_commit(&f, what);
    file_abort(&f);
    return rc;
}

/* ---- the header --------------------------------------------------------------------- */

/* Adds item to a cJSON object (key != NULL) or array; frees it when that fails. */
static int add_item(cJSON *parent, const char *key, cJSON *item)
{
    if (!item) return 0;
    if (key ? cJSON_AddItemToObject(parent, key, item) : cJSON_AddItemToArray(parent, item))
        return 1;
    cJSON_Delete(item);
    return 0;
}

/* Integers as raw text: exact for any 64-bit value, where cJSON's numbers are doubles. */
static int add_u64(cJSON *parent, const char *key, uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    return add_item(parent, key, cJSON_CreateRaw(buf));
}

/* The header JSON of tensors [0, n), with `format` (may be NULL) as a
 * "format" metadata entry the caller's metadata does not already give. */
static char *header_json(size_t n, const char *const *names, const ws_tensor *tensors,
                         size_t n_meta, const char *const *meta_kv, const char *format)
{
    cJSON *root = cJSON_CreateObject();
    int ok = root != NULL;
    for (size_t i = 0; i < n_meta && format; i++)
        if (strcmp(meta_kv[2 * i], "format") == 0) format = NULL;
    if (ok && (n_meta || format)) {
        cJSON *meta = cJSON_CreateObject();
        ok = add_item(root, "__metadata__", meta);
        if (ok && format) ok = add_item(meta, "format", cJSON_CreateString(format));
        for (size_t i = 0; ok && i < n_meta; i++)
            ok = add_item(meta, meta_kv[2 * i], cJSON_CreateString(meta_kv[2 * i + 1]));
    }
    uint64_t offset = 0;
    for (size_t i = 0; ok && i < n; i++) {
        const ws_tensor *t = &tensors[i];
        cJSON *entry = cJSON_CreateObject(), *shape = NULL, *offsets = NULL;
        ok = add_item(root, names[i], entry) &&
             add_item(entry, "dtype", cJSON_CreateString(st_dtype_name(t->dtype))) &&
             add_item(entry, "shape", shape = cJSON_CreateArray());
        for (int d = 0; ok && d < t->layout.ndim; d++)
            ok = add_u64(shape, NULL, (uint64_t)t->layout.shape[d]);
        uint64_t end = offset + ws_tensor_nbytes(t);
        ok = ok && add_item(entry, "data_offsets", offsets = cJSON_CreateArray()) &&
             add_u64(offsets, NULL, offset) && add_u64(offsets, NULL, end);
        offset = end;
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}

/* ---- tensor data ----------------------------------------------------------------------- */

typedef struct st_writer {
    const char *what;
    size_t staging_bytes;
    size_t max_device_bytes;
    ws_tensor staging; /* released until the first device tensor */
    ws_st_progress_fn progress;
    void *progress_ctx;
    uint64_t done, total, reported;
    int final_sent;
} st_writer;

static ws_status report(st_writer *w, const char *path)
{
    if (!w->progress) return WS_OK;
    int last = w->done == w->total;
    if (!last && w->done - w->reported < w->staging_bytes) return WS_OK;
    if (last && w->final_sent) return WS_OK;
    w->reported = w->done;
    w->final_sent = last;
    if (w->progress(w->done, w->total, w->progress_ctx) != 0)
        return WS_ERR(WS_ERR_INTERRUPTED, "%s: writing '%s': stopped by the progress callback",
                      w->what, path);
    return WS_OK;
}

/* One staging buffer for all device tensors of a save, no larger than the
 * largest of them. Pinned memory makes the copies fast; plain host memory
 * still works when pinned memory is short. */
static ws_status staging_alloc(st_writer *w, ws_device *dev)
{
    if (!ws_tensor_is_released(&w->staging)) return WS_OK;
    size_t bytes = w->staging_bytes < w->max_device_bytes ? w->staging_bytes : w->max_device_bytes;
    int64_t shape = (int64_t)bytes;
    ws_tensor_opts pinned = {.pinned = 1, .pin_device = dev, .name = "safetensors staging"};
    if (ws_tensor_empty(&w->staging, WS_U8, 1, &shape, &pinned) == WS_OK) return WS_OK;
    ws_tensor_opts plain = {.name = "safetensors staging"};
    ws_status rc = ws_tensor_empty(&w->staging, WS_U8, 1, &shape, &plain);
    if (rc != WS_OK) ws_errprefix("%s: staging buffer for device tensors", w->what);
    return rc;
}

/* Device bytes [off, off+len) of flat into the staging buffer, then the file. */
static ws_status write_device_chunk(st_writer *w, st_file *f, const ws_tensor *flat, size_t off,
                                    size_t len)
{
    ws_tensor src = {0}, dst = {0};
    void *p = NULL;
    ws_status rc = ws_tensor_narrow(&src, flat, 0, (int64_t)off, (int64_t)len);
    if (rc == WS_OK) rc = ws_tensor_narrow(&dst, &w->staging, 0, 0, (int64_t)len);
    if (rc == WS_OK) rc = ws_tensor_copy(&dst, &src);
    if (rc == WS_OK) rc = ws_tensor_access(&dst, WS_ACCESS_READ, w->what, &p);
    if (rc == WS_OK) rc = file_write(f, w->what, p, len);
    ws_tensor_free(&src);
    ws_tensor_free(&dst);
    return rc;
}

/* A progress callback may free the caller's tensor, put its pool to sleep
 * or discard its contents: the writer's own reference (`held`) keeps the
 * memory, and this check before every chunk turns such a change into an
 * error naming the tensor instead of a read of memory that is gone. */
static ws_status check_still_readable(const st_writer *w, const st_file *f, const char *name,
                                      const ws_tensor *t, const ws_tensor *held)
{
    if (ws_tensor_is_released(t) || t->storage != held->storage)
        return WS_ERR(WS_ERR_FREED, "%s: writing '%s': tensor '%s' was freed while it was being "
                      "saved (by the progress callback?); keep the tensors alive until the save "
                      "returns", w->what, f->path, name);
    ws_status rc = ws_tensor_check_readable(t, w->what);
    if (rc != WS_OK) ws_errprefix("writing '%s' (tensor '%s')", f->path, name);
    return rc;
}

/* The caller's tensor t through the writer's own view `held` of it. */
static ws_status write_tensor(st_writer *w, st_file *f, const char *name, const ws_tensor *t,
                              const ws_tensor *held)
{
    size_t nbytes = ws_tensor_nbytes(held);
    WS_TRY(check_still_readable(w, f, name, t, held));
    if (nbytes == 0) return report(w, f->path);
    ws_device *dev = ws_tensor_device(held);
    ws_status rc = WS_OK;
    if (dev->kind == WS_DEVICE_CPU) {
        for (size_t off = 0; off < nbytes && rc == WS_OK;) {
            size_t len = nbytes - off < w->staging_bytes ? nbytes - off : w->staging_bytes;
            void *p = NULL;
            rc = check_still_readable(w, f, name, t, held);
            if (rc == WS_OK) rc = ws_tensor_access(held, WS_ACCESS_READ, w->what, &p);
            if (rc == WS_OK) rc = file_write(f, w->what, (const char *)p + off, len);
            off += len;
            w->done += rc == WS_OK ? len : 0;
            if (rc == WS_OK) rc = report(w, f->path);
        }
        return rc;
    }
    ws_tensor flat = {0};
    rc = staging_alloc(w, dev);
    if (rc == WS_OK) rc = ws_tensor_flat_bytes(&flat, held);
    size_t chunk = ws_tensor_is_released(&w->staging) ? 0 : ws_tensor_nbytes(&w->staging);
    for (size_t off = 0; off < nbytes && rc == WS_OK;) {
        size_t len = nbytes - off < chunk ? nbytes - off : chunk;
        rc = check_still_readable(w, f, name, t, held);
        if (rc == WS_OK) rc = write_device_chunk(w, f, &flat, off, len);
        off += len;
        w->done += rc == WS_OK ? len : 0;
        if (rc == WS_OK) rc = report(w, f->path);
    }
    ws_tensor_free(&flat);
    if (rc != WS_OK && rc != WS_ERR_IO && rc != WS_ERR_INTERRUPTED && rc != WS_ERR_FREED &&
        rc != WS_ERR_DISCARDED)
        ws_errprefix("%s: tensor '%s' (%s)", w->what, name, dev->name);
    return rc;
}

/* One safetensors file of tensors [0, n): header, data, commit. The final
 * progress report comes before the commit, so a stop asked for there (or an
 * error raised by a Lua callback) still publishes nothing. */
static ws_status write_file(st_writer *w, const char *path, size_t n, const char *const *names,
                            const ws_tensor *const *tensors, const ws_tensor *held,
                            size_t n_meta, const char *const *meta_kv, const char *format)
{
    char *json = header_json(n, names, held, n_meta, meta_kv, format);
    if (!json) return WS_ERR(WS_ERR_NOMEM, "%s: out of memory building the header of '%s'",
                             w->what, path);
    size_t len = strlen(json), padded = (len + 7) / 8 * 8;
    if (padded > ST_MAX_HEADER_BYTES) {
        free(json);
        return WS_ERR(WS_ERR_ARG, "%s: the header of '%s' would take %zu bytes, over the %u that "
                      "safetensors readers accept; save a sharded checkpoint instead",
                      w->what, path, padded, ST_MAX_HEADER_BYTES);
    }
    unsigned char prefix[8];
    for (int i = 0; i < 8; i++) prefix[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    static const char spaces[8] = "       ";
    st_file f;
    ws_status rc = file_open(&f, w->what, path);
    if (rc == WS_OK) rc = file_write(&f, w->what, prefix, sizeof prefix);
    if (rc == WS_OK) rc = file_write(&f, w->what, json, len);
    if (rc == WS_OK) rc = file_write(&f, w->what, spaces, padded - len);
    free(json);
    for (size_t i = 0; i < n && rc == WS_OK; i++)
        rc = write_tensor(w, &f, names[i], tensors[i], &held[i]);
    if (rc == WS_OK) rc = report(w, path);
    if (rc == WS_OK) rc = file_commit(&f, w->what);
    file_abort(&f);
    return rc;
}

/* The writer's own reference to each tensor for the length of the save:
 * what the header describes and the bytes written stay as they were when
 * the save began, whatever a progress callback does to the caller's structs. */
static ws_status hold_tensors(const char *what, size_t n, const ws_tensor *const *tensors,
                              ws_tensor **out)
{
    *out = ws_malloc((n ? n : 1) * sizeof **out);
    if (!*out) return WS_ERR(WS_ERR_NOMEM, "%s: out of memory holding %zu tensors", what, n);
    for (size_t i = 0; i < n; i++) {
        (*out)[i] = *tensors[i];
        (*out)[i].name = NULL;
        ws_storage_retain((*out)[i].storage);
    }
    return WS_OK;
}

static void release_tensors(size_t n, ws_tensor *held)
{
    for (size_t i = 0; held && i < n; i++) ws_tensor_free(&held[i]);
    free(held);
}

static void writer_init(st_writer *w, const char *what, size_t staging_bytes,
                        const st_sizes *sz, ws_st_progress_fn progress, void *ctx)
{
    memset(w, 0, sizeof *w);
    w->what = what;
    w->staging_bytes = staging_bytes ? staging_bytes : WS_ST_DEFAULT_STAGING_BYTES;
    w->max_device_bytes = sz->max_device_bytes;
    w->total = sz->total;
    w->progress = progress;
    w->progress_ctx = ctx;
}

ws_status ws_st_write(const char *path, size_t n, const char *const *names,
                      const ws_tensor *const *tensors, size_t n_meta, const char *const *meta_kv,
                      size_t staging_bytes, ws_st_progress_fn progress, void *progress_ctx)
{
    const char *what = "save_safetensors";
    if (!path) return WS_ERR(WS_ERR_ARG, "%s: no path given", what);
    st_sizes sz;
    WS_TRY(check_args(what, n, names, tensors, n_meta, meta_kv, &sz));
    ws_tensor *held = NULL;
    WS_TRY(hold_tensors(what, n, tensors, &held));
    st_writer w;
    writer_init(&w, what, staging_bytes, &sz, progress, progress_ctx);
    ws_status rc = write_file(&w, path, n, names, tensors, held, n_meta, meta_kv, NULL);
    ws_tensor_free(&w.staging);
    release_tensors(n, held);
    return rc;
}

/* ---- sharded checkpoints ------------------------------------------------------------------- */

int ws_st_shard_filename(char *buf, size_t n, const char *prefix, size_t index, size_t n_shards)
{
    if (n_shards <= 1) return snprintf(buf, n, "%s.safetensors", prefix);
    return snprintf(buf, n, "%s-%05zu-of-%05zu.safetensors", prefix, index + 1, n_shards);
}

int ws_st_index_filename(char *buf, size_t n, const char *prefix)
{
    return snprintf(buf, n, "%s.safetensors.index.json", prefix);
}

/* mkdir -p: each missing level, then a check that the result is a directory. */
static ws_status make_dirs(const char *what, const char *dir)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return WS_ERR(WS_ERR_ARG, "%s: directory '%s' is too long", what, dir);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0') continue;
        char c = *p;
        *p = '\0';
        struct stat st;
        if (mkdir(buf, 0777) != 0 && errno != EEXIST &&
            !(stat(buf, &st) == 0 && S_ISDIR(st.st_mode)))
            return WS_ERR(WS_ERR_IO, "%s: cannot create directory '%s': %s", what, buf,
                          strerror(errno));
        *p = c;
        if (!c) break;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return WS_ERR(WS_ERR_IO, "%s: '%s' exists and is not a directory", what, dir);
    return WS_OK;
}

/* dir/name (allocated; the caller frees *out), without doubling a slash the
 * caller put at the end of dir. Never cut short: a path too long for the
 * system fails where it is used, naming it. */
static ws_status join(const char *what, const char *dir, const char *name, char **out)
{
    size_t k = strlen(dir), n = k + strlen(name) + 2;
    *out = ws_malloc(n);
    if (!*out)
        return WS_ERR(WS_ERR_NOMEM, "%s: out of memory naming '%s' in '%s'", what, name, dir);
    snprintf(*out, n, "%s%s%s", dir, k && dir[k - 1] == '/' ? "" : "/", name);
    return WS_OK;
}

static ws_status remove_file(const char *what, const char *dir, const char *name)
{
    char *path = NULL;
    WS_TRY(join(what, dir, name, &path));
    ws_status rc = WS_OK;
    if (unlink(path) != 0 && errno != ENOENT)
        rc = WS_ERR(WS_ERR_IO, "%s: cannot remove the stale file '%s' of an earlier save: %s",
                    what, path, strerror(errno));
    free(path);
    return rc;
}

/* Reads at least 5 digits; returns the position after them or NULL. */
static const char *digits(const char *p, unsigned long long *v)
{
    const char *s = p;
    *v = 0;
    while (*p >= '0' && *p <= '9') *v = *v * 10 + (unsigned long long)(*p++ - '0');
    return p - s >= 5 ? p : NULL;
}

/* Whether `name` is "<prefix>-NNNNN-of-MMMMM.safetensors"; *of = MMMMM. */
static int is_shard_name(const char *name, const char *prefix, unsigned long long *of)
{
    size_t k = strlen(prefix);
    unsigned long long index;
    if (strncmp(name, prefix, k) != 0 || name[k] != '-') return 0;
    const char *p = digits(name + k + 1, &index);
    if (!p || strncmp(p, "-of-", 4) != 0 || !(p = digits(p + 4, of))) return 0;
    return strcmp(p, ".safetensors") == 0 && index >= 1 && index <= *of;
}

/* Removes the files of an earlier save under `prefix` that a loader could
 * take for this one: the single file after a sharded save, the index after a
 * single-file save (first, so no index outlives its shards), and shards of
 * another count. */
static ws_status remove_stale(const char *what, const char *dir, const char *prefix,
                              size_t n_shards)
{
    char name[ST_NAME_MAX + 1]; /* its length was checked before the save began */
    if (n_shards > 1) {
        ws_st_shard_filename(name, sizeof name, prefix, 0, 1);
    } else {
        ws_st_index_filename(name, sizeof name, prefix);
    }
    WS_TRY(remove_file(what, dir, name));
    DIR *d = opendir(dir);
    if (!d)
        return WS_ERR(WS_ERR_IO, "%s: cannot list '%s' for stale shards: %s", what, dir,
                      strerror(errno));
    ws_status rc = WS_OK;
    const struct dirent *e;
    while (rc == WS_OK && (e = readdir(d)) != NULL) {
        unsigned long long of;
        if (is_shard_name(e->d_name, prefix, &of) && (n_shards == 1 || of != n_shards))
            rc = remove_file(what, dir, e->d_name);
    }
    closedir(d);
    return rc;
}

static ws_status write_index(const char *what, const char *path, const char *prefix,
                             size_t n, const char *const *names, const size_t *shard_of,
                             size_t n_shards, uint64_t total)
{
    cJSON *root = cJSON_CreateObject(), *meta = NULL, *map = NULL;
    int ok = root && add_item(root, "metadata", meta = cJSON_CreateObject()) &&
             add_u64(meta, "total_size", total) &&
             add_item(root, "weight_map", map = cJSON_CreateObject());
    char file[ST_NAME_MAX + 1]; /* its length was checked before the save began */
    for (size_t i = 0; ok && i < n; i++) {
        ws_st_shard_filename(file, sizeof file, prefix, shard_of[i], n_shards);
        ok = add_item(map, names[i], cJSON_CreateString(file));
    }
    char *text = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    char *line = text ? ws_malloc(strlen(text) + 2) : NULL;
    if (!line) {
        free(text);
        return WS_ERR(WS_ERR_NOMEM, "%s: out of memory building the index '%s'", what, path);
    }
    snprintf(line, strlen(text) + 2, "%s\n", text);
    free(text);
    ws_status rc = write_text_file(what, path, line);
    free(line);
    return rc;
}

/* Every name a save of n_shards under prefix writes or removes fits in a
 * file name: the shards and the index (removed after a one-file save). A
 * name over the limit is misuse, found before anything is written, never a
 * name cut short into another one. */
static ws_status check_file_names(const char *what, const char *prefix, size_t n_shards)
{
    char name[ST_NAME_MAX + 1], suffix[64];
    for (int i = 0; i < 2; i++) {
        int k = i ? ws_st_index_filename(name, sizeof name, prefix)
                  : ws_st_shard_filename(name, sizeof name, prefix, 0, n_shards);
        if (k >= 0 && k <= ST_NAME_MAX) continue;
        if (i) ws_st_index_filename(suffix, sizeof suffix, "");
        else ws_st_shard_filename(suffix, sizeof suffix, "", 0, n_shards);
        return WS_ERR(WS_ERR_ARG, "%s: prefix '" ST_ABBREV_FMT "' is too long: the file name '"
                      ST_ABBREV_FMT "%s' would be %d bytes, over the %d a file name may have; "
                      "use a shorter prefix",
                      what, ST_ABBREV(prefix), ST_ABBREV(prefix), suffix, k, ST_NAME_MAX);
    }
    return WS_OK;
}

size_t ws_st_shard_split(size_t n, const uint64_t *bytes, uint64_t max_shard_bytes,
                         size_t *shard_of)
{
    if (!max_shard_bytes) max_shard_bytes = WS_ST_DEFAULT_MAX_SHARD_BYTES;
    size_t n_shards = 1, begin = 0;
    uint64_t current = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > begin && current + bytes[i] > max_shard_bytes) {
            begin = i;
            n_shards++;
            current = 0;
        }
        shard_of[i] = n_shards - 1;
        current += bytes[i];
    }
    return n_shards;
}

ws_status ws_st_save_index(const char *dir, const char *prefix, size_t n,
                           const char *const *names, const size_t *shard_of, size_t n_shards,
                           uint64_t total_bytes)
{
    const char *what = "save_index";
    if (!prefix) prefix = "model";
    WS_TRY(check_file_names(what, prefix, n_shards));
    for (size_t i = 0; i < n; i++)
        if (shard_of[i] >= n_shards)
            return WS_ERR(WS_ERR_ARG, "%s: tensor '%s' is in shard %zu of %zu", what, names[i],
                          shard_of[i] + 1, n_shards);
    char file[ST_NAME_MAX + 1], *path = NULL;
    ws_st_index_filename(file, sizeof file, prefix);
    WS_TRY(join(what, dir, file, &path));
    ws_status rc = write_index(what, path, prefix, n, names, shard_of, n_shards, total_bytes);
    free(path);
    return rc;
}

ws_status ws_st_write_text(const char *path, const char *text)
{
    return write_text_file("write_text", path, text);
}

ws_status ws_st_save_sharded(const char *dir, const char *prefix, size_t n,
                             const char *const *names, const ws_tensor *const *tensors,
                             uint64_t max_shard_bytes, size_t n_meta, const char *const *meta_kv,
                             size_t staging_bytes, ws_st_progress_fn progress, void *progress_ctx,
                             size_t *n_shards_out)
{
    const char *what = "save_checkpoint";
    if (n_shards_out) *n_shards_out = 0;
    if (!dir || !*dir) return WS_ERR(WS_ERR_ARG, "%s: no directory given", what);
    if (!prefix) prefix = "model";
    if (!*prefix || strchr(prefix, '/'))
        return WS_ERR(WS_ERR_ARG, "%s: prefix '%s' must be a plain, non-empty file name", what,
                      prefix);
    if (!max_shard_bytes) max_shard_bytes = WS_ST_DEFAULT_MAX_SHARD_BYTES;
    st_sizes sz;
    WS_TRY(check_args(what, n, names, tensors, n_meta, meta_kv, &sz));

    /* Shard of each tensor, and where each shard begins (shards are runs of
     * consecutive tensors): n shards at most (1 for n = 0), then the end. */
    size_t *shard_of = ws_malloc((n ? n : 1) * sizeof *shard_of);
    size_t *first = ws_malloc((n + 2) * sizeof *first);
    uint64_t *bytes = ws_malloc((n ? n : 1) * sizeof *bytes);
    if (!shard_of || !first || !bytes) {
        free(shard_of);
        free(first);
        free(bytes);
        return WS_ERR(WS_ERR_NOMEM, "%s: out of memory planning shards of %zu tensors", what, n);
    }
    for (size_t i = 0; i < n; i++) bytes[i] = ws_tensor_nbytes(tensors[i]);
    size_t n_shards = ws_st_shard_split(n, bytes, max_shard_bytes, shard_of);
    free(bytes);
    first[0] = 0;
    for (size_t i = 1; i < n; i++)
        if (shard_of[i] != shard_of[i - 1]) first[shard_of[i]] = i;
    first[n_shards] = n;

    char file[ST_NAME_MAX + 1], *path = NULL;
    ws_tensor *held = NULL;
    ws_status rc = check_file_names(what, prefix, n_shards);
    if (rc == WS_OK) rc = hold_tensors(what, n, tensors, &held);
    st_writer w;
    writer_init(&w, what, staging_bytes, &sz, progress, progress_ctx);
    if (rc == WS_OK) rc = make_dirs(what, dir);
    if (rc == WS_OK && n_shards > 1) {
        /* The old index would name a mix of old and new shards while these are written. */
        ws_st_index_filename(file, sizeof file, prefix);
        rc = remove_file(what, dir, file);
    }
    for (size_t s = 0; s < n_shards && rc == WS_OK; s++) {
        ws_st_shard_filename(file, sizeof file, prefix, s, n_shards);
        rc = join(what, dir, file, &path);
        if (rc == WS_OK)
            rc = write_file(&w, path, first[s + 1] - first[s], names + first[s],
                            tensors + first[s], held + first[s], n_meta, meta_kv, "pt");
        free(path);
        path = NULL;
    }
    if (rc == WS_OK && n_shards > 1) {
        ws_st_index_filename(file, sizeof file, prefix);
        rc = join(what, dir, file, &path);
        if (rc == WS_OK)
            rc = write_index(what, path, prefix, n, names, shard_of, n_shards, sz.total);
        free(path);
    }
    if (rc == WS_OK) rc = remove_stale(what, dir, prefix, n_shards);
    if (rc == WS_OK && n_shards_out) *n_shards_out = n_shards;
    ws_tensor_free(&w.staging);
    release_tensors(n, held);
    free(shard_of);
    free(first);
    return rc;
}
