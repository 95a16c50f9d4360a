/* tensor.h: tensors, views and shared storage.
 *
 * A ws_storage is one allocation (device memory, host memory, pinned host
 * memory, or a slice of a sleepable pool) with a reference count. A ws_tensor
 * is a typed, strided view of a storage; views share the storage and keep it
 * alive. ws_tensor is a plain struct so the Lua bindings can embed it in a
 * userdata; a zeroed struct is the released state.
 *
 * Contents validity: storage inside a pool knows which byte ranges hold data
 * written since the pool last discarded them (ws_pool_sleep). Every operation
 * gets a tensor's data pointer from ws_tensor_access, which refuses a sleeping
 * pool, a write to read-only memory and, for a read, discarded bytes; every
 * write then calls ws_tensor_mark_written. Reading discarded bytes is WS_ERR_DISCARDED with a
 * message naming the tensor, the pool and the sleep that discarded it. */
#ifndef WS_TENSOR_H
#define WS_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "device.h"
#include "dtype.h"
#include "status.h"

typedef struct ws_pool ws_pool;

typedef enum ws_storage_kind {
    WS_STORAGE_DEVICE = 0, /* device->ops->alloc */
    WS_STORAGE_HOST_PINNED, /* owner->ops->host_alloc; lives on the cpu device */
    WS_STORAGE_POOL,       /* carved from a pool; freed with the pool */
    WS_STORAGE_EXTERNAL    /* memory someone else owns (a mapped file); see ws_tensor_external */
} ws_storage_kind;

typedef struct ws_range { size_t begin, end; } ws_range;

typedef struct ws_storage {
    int refcount;
    ws_storage_kind kind;
    ws_device *device; /* where the bytes live (cpu for pinned host memory) */
    ws_device *owner;  /* whose ops free it (the cuda device for pinned memory) */
    void *data;        /* reached through ws_tensor_access only */
    size_t nbytes;
    ws_pool *pool;     /* WS_STORAGE_POOL only */
    size_t pool_offset;
    /* Written byte ranges since the last discard, sorted and merged. Only
     * kept for pool storage; other storage is always valid. */
    ws_range *written;
    size_t n_written, cap_written;
    char *name;        /* name of the tensor that allocated it */
    /* WS_STORAGE_EXTERNAL only: called once with release_ctx when the last
     * reference goes; read_only refuses every write; source names where the
     * bytes come from in messages ("model.safetensors"). */
    void (*release)(void *release_ctx);
    void *release_ctx;
    int read_only;
    char *source;
} ws_storage;

typedef struct ws_tensor {
    ws_storage *storage; /* NULL: released */
    size_t offset;       /* bytes from storage->data */
    ws_dtype dtype;
    ws_layout layout;
    char *name;          /* owned; may be NULL */
} ws_tensor;

typedef struct ws_tensor_opts {
    ws_device *device;   /* NULL: cpu */
    int pinned;          /* host tensor in pinned memory of `pin_device` */
    ws_device *pin_device;
    ws_pool *pool;       /* allocate from a pool (overrides device) */
    const char *name;
} ws_tensor_opts;

/* Allocates a new tensor. On failure *t stays released. */
ws_status ws_tensor_empty(ws_tensor *t, ws_dtype dtype, int ndim, const int64_t *shape,
                          const ws_tensor_opts *opts);
/* Memory the tensor does not allocate: `data` (nbytes long, on `device`,
 * NULL: cpu) stays owned by whoever passed it, who learns through
 * release(release_ctx) when the last tensor or view over it is gone. */
typedef struct ws_external {
    void *data;
    size_t nbytes;
    ws_device *device;
    int read_only;      /* writes fail with WS_ERR_ARG naming the tensor and `source` */
    const char *source; /* copied; may be NULL */
    void (*release)(void *release_ctx); /* may be NULL */
    void *release_ctx;
} ws_external;

/* A contiguous tensor of dtype and shape over mem->data, which must hold its
 * bytes. On success the new storage owns the release; on failure *t stays
 * released and release is not called (the caller still owns the memory). */
ws_status ws_tensor_external(ws_tensor *t, const ws_external *mem, ws_dtype dtype, int ndim,
                             const int64_t *shape, const char *name);
/* Whether writes to t are refused (external read-only memory). */
int ws_tensor_is_read_only(const ws_tensor *t);
/* Drops the storage reference and the name and zeroes the struct; idempotent. */
void ws_tensor_free(ws_tensor *t);
/* Drops the storage reference but keeps the name, so later use reports
 * "tensor 'x' was freed" (a Lua t:free()); ws_tensor_free frees the rest. */
void ws_tensor_release(ws_tensor *t);
/* Whether the tensor holds no storage (released or freed). */
int ws_tensor_is_released(const ws_tensor *t);
/* "bf16[2,3]" — for messages. */
const char *ws_tensor_typestr(const ws_tensor *t, char *buf, size_t n);
/* "'model.x.weight'" or "<unnamed bf16[2,3]>" — for messages. */
const char *ws_tensor_label(const ws_tensor *t, char *buf, size_t n);
ws_status ws_tensor_set_name(ws_tensor *t, const char *name);

static inline ws_device *ws_tensor_device(const ws_tensor *t) { return t->storage->device; }

/* How an operation uses a tensor's bytes (ws_tensor_access). */
enum { WS_ACCESS_READ = 1, WS_ACCESS_WRITE = 2 };
/* The only way to a tensor's data pointer: *ptr is set only once the tensor
 * passed the check for `access` (a bit set of WS_ACCESS_*): live, for a
 * write not read-only and, in a pool, the pool awake (its addresses have no memory behind them while it
 * sleeps); for a read, the bytes also hold data written since the last
 * discard. A caller that writes calls ws_tensor_mark_written afterwards.
 * Checking where the pointer is handed out means no path (a collective, a
 * batch, a sync plan) can reach a sleeping pool's memory by forgetting a
 * check. `what` starts the error message. */
ws_status ws_tensor_access(const ws_tensor *t, int access, const char *what, void **ptr);
int64_t ws_tensor_numel(const ws_tensor *t);
size_t ws_tensor_nbytes(const ws_tensor *t);
int ws_tensor_is_contiguous(const ws_tensor *t);
/* Same number of dimensions and the same size in each (dtype and strides
 * aside): what a copy between the two requires. */
int ws_tensor_same_shape(const ws_tensor *a, const ws_tensor *b);

/* Views (share storage, add a reference). `out` must be released. Dims are
 * 0-based here; the Lua bindings translate from 1-based. */
ws_status ws_tensor_narrow(ws_tensor *out, const ws_tensor *t, int dim, int64_t start,
                           int64_t length);
ws_status ws_tensor_reshape(ws_tensor *out, const ws_tensor *t, int ndim, const int64_t *shape);
ws_status ws_tensor_flat_bytes(ws_tensor *out, const ws_tensor *t); /* u8 [nbytes] */
ws_status ws_tensor_view_dtype(ws_tensor *out, const ws_tensor *t, ws_dtype dtype); /* reinterpret */

/* Data operations; all check freed / discarded state and name the tensor. */
ws_status ws_tensor_copy(ws_tensor *dst, const ws_tensor *src); /* shapes equal, any devices/dtypes */
ws_status ws_tensor_fill(ws_tensor *t, double value);
ws_status ws_tensor_random(ws_tensor *t, uint64_t seed, float scale, uint64_t first_index);
ws_status ws_tensor_checksum(const ws_tensor *t, uint64_t first_index, ws_dtype as, uint64_t *out);
/* The checksum of a contiguous t seen as rows of `cols` elements, element j
 * of row i hashed with index first_index + i * pitch + j: a block of a larger
 * tensor of `pitch` columns (a tensor-parallel shard of a row-parallel
 * layer) with its global indices, so the blocks of a tensor sum to its
 * checksum. cols == 0: ws_tensor_checksum. */
ws_status ws_tensor_checksum_rows(const ws_tensor *t, uint64_t first_index, int64_t cols,
                                  int64_t pitch, ws_dtype as, uint64_t *out);
/* Flat index (row-major over the view); synchronizes. */
ws_status ws_tensor_get(const ws_tensor *t, int64_t flat_index, double *out);
ws_status ws_tensor_set(ws_tensor *t, int64_t flat_index, double value);
/* Raw element bits (zero-extended), exact for i64 where doubles are not. */
ws_status ws_tensor_get_bits(const ws_tensor *t, int64_t flat_index, uint64_t *out);
ws_status ws_tensor_set_bits(ws_tensor *t, int64_t flat_index, uint64_t bits);

/* Batched operations: one call, a C loop (one batched device call where the
 * backend supports it). Tensors must be contiguous. */
/* flat (1-D, any dtype viewed as bytes) <- concatenation of srcs, each
 * converted to flat's dtype unless flat is u8 (then raw bytes). Offsets are
 * element offsets into flat; NULL offsets: packed back to back. */
ws_status ws_pack(ws_tensor *flat, const ws_tensor *const *srcs, size_t n,
                  const size_t *offsets);
ws_status ws_unpack(const ws_tensor *flat, ws_tensor *const *dsts, size_t n,
                    const size_t *offsets);
/* dsts[i] <- srcs[i], shapes equal, conversion where dtypes differ. */
ws_status ws_copy_many(ws_tensor *const *dsts, const ws_tensor *const *srcs, size_t n);
/* out[i] = checksum of ts[i] (ws_tensor_checksum) with first index first[i]
 * (NULL: all 0), hashing values as `as` (WS_DTYPE_COUNT: each tensor's own
 * dtype). The verification of a whole model in one call. */
ws_status ws_checksum_many(const ws_tensor *const *ts, size_t n, const uint64_t *first,
                           ws_dtype as, uint64_t *out);
/* The same with rows (ws_tensor_checksum_rows): cols[i] and pitch[i] per
 * tensor (cols NULL, or cols[i] == 0: plain). */
ws_status ws_checksum_many_rows(const ws_tensor *const *ts, size_t n, const uint64_t *first,
                                const int64_t *cols, const int64_t *pitch, ws_dtype as,
                                uint64_t *out);

/* Validity checks used by every op (and by the comm and transfer layers). */
ws_status ws_tensor_check_live(const ws_tensor *t, const char *what);
ws_status ws_tensor_check_readable(const ws_tensor *t, const char *what);
void ws_tensor_mark_written(const ws_tensor *t);
/* Live, not read-only, and not in a sleeping pool (whose memory is
 * unmapped). Every op that writes a tensor calls it first. */
ws_status ws_tensor_check_writable(const ws_tensor *t, const char *what);
/* Byte range [begin, end) of the storage that the view spans. */
void ws_tensor_byte_span(const ws_tensor *t, size_t *begin, size_t *end);

/* Storage reference counting (used by views and the bindings). */
void ws_storage_retain(ws_storage *s);
void ws_storage_release(ws_storage *s);

#endif
