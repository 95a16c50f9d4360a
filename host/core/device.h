/* device.h: the device backend vtable and the device registry.
 *
 * A device owns memory and runs the few byte-level operations the rest of the
 * core needs. Two backends implement it: cpu (device_cpu.c) and cuda
 * (device_cuda.c, present when the CUDA toolkit was found at configure time;
 * at run time it reports itself unusable when there is no driver or GPU).
 *
 * Ordering: operations on one device are ordered as if issued to one queue.
 * Any operation that reads or writes host memory (a CPU tensor) has completed
 * when it returns; device-only work may still be in flight until
 * ws_device_synchronize(). */
#ifndef WS_DEVICE_H
#define WS_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "status.h"

#define WS_MAX_DIMS 8

typedef enum ws_device_kind { WS_DEVICE_CPU = 0, WS_DEVICE_CUDA = 1 } ws_device_kind;

typedef struct ws_device ws_device;
typedef struct ws_event ws_event;

/* A strided element layout: shape and strides in elements (not bytes). */
typedef struct ws_layout {
    int ndim;
    int64_t shape[WS_MAX_DIMS];
    int64_t strides[WS_MAX_DIMS];
} ws_layout;

/* One contiguous copy with optional dtype conversion, for batched execution. */
typedef struct ws_copy_desc {
    void *dst;
    const void *src;
    size_t count;       /* elements */
    ws_dtype dst_dtype;
    ws_dtype src_dtype; /* equal dtypes: a plain byte copy of count*size bytes */
} ws_copy_desc;

/* One tensor of a block-scaled FP8 quantization (quant.h, quant_block.h):
 * src [batch, rows, cols] contiguous -> q (fp8 e4m3, same shape) and
 * scale_inv (f32 [batch, ceil(rows/128), ceil(cols/128)]). */
typedef struct ws_quant_desc {
    const void *src;
    ws_dtype src_dtype; /* f32, bf16 or f16 */
    void *q;
    float *scale_inv;
    int64_t batch, rows, cols;
} ws_quant_desc;

typedef struct ws_mem_info {
    size_t total;      /* device memory in bytes (host RAM for the cpu device) */
    size_t free;       /* as the OS or driver reports it now */
    size_t held;       /* bytes wshost holds on this device now */
    size_t peak;       /* high-water mark of `held` since start or reset */
} ws_mem_info;

typedef struct ws_device_ops {
    const char *kind_name; /* "cpu", "cuda" */

    /* Device memory (for the cpu device: 64-byte aligned host memory). */
    ws_status (*alloc)(ws_device *d, size_t bytes, void **out);
    void (*free)(ws_device *d, void *ptr, size_t bytes);
    /* Host memory the device can read at full speed (pinned on cuda). */
    ws_status (*host_alloc)(ws_device *d, size_t bytes, void **out);
    void (*host_free)(ws_device *d, void *ptr, size_t bytes);

    /* Byte copy; either side may be host memory or memory of this device. */
    ws_status (*copy)(ws_device *d, void *dst, const void *src, size_t bytes);
    /* Many contiguous copies, with conversion where dtypes differ. */
    ws_status (*copy_batch)(ws_device *d, const ws_copy_desc *descs, size_t n);
    /* Strided copy with conversion: dst[layout] = src[layout], shapes equal. */
    ws_status (*copy_strided)(ws_device *d, void *dst, ws_dtype dt, const ws_layout *dl,
                              const void *src, ws_dtype st, const ws_layout *sl);
    ws_status (*fill)(ws_device *d, void *ptr, ws_dtype t, size_t count, double value);
    /* ptr[i] = ws_random_elem(seed, first_index + i, scale), contiguous. */
    ws_status (*random)(ws_device *d, void *ptr, ws_dtype t, size_t count, uint64_t seed,
                        uint64_t first_index, float scale);
    /* Sum of ws_hash_elem(first_index + logical_index, bits) over a strided
     * view. If as != t, each element is first converted to `as` and the bits
     * of the converted value are hashed. */
    ws_status (*checksum)(ws_device *d, const void *ptr, ws_dtype t, const ws_layout *l,
                          uint64_t first_index, ws_dtype as, uint64_t *out);
    /* Optional (may be NULL: ws_tensor_checksum_rows then calls checksum
     * once per row): the same over `rows` x `cols` contiguous elements,
     * element j of row i hashed with index first_index + i * pitch + j, so
     * a block of a larger tensor sums with its global indices. */
    ws_status (*checksum_rows)(ws_device *d, const void *ptr, ws_dtype t, int64_t rows,
                               int64_t cols, uint64_t first_index, uint64_t pitch, ws_dtype as,
                               uint64_t *out);

    /* Block-scaled FP8 quantization of many tensors in one call, with the
     * arithmetic of quant_block.h (both backends give the same bits). */
    ws_status (*quantize_fp8_block)(ws_device *d, const ws_quant_desc *descs, size_t n);

    ws_status (*synchronize)(ws_device *d);
    /* Optional: whether the device has been set up for use (a GPU wshost has
     * not touched yet has no streams or context); NULL: always. */
    int (*in_use)(const ws_device *d);
    ws_status (*mem_info)(ws_device *d, size_t *free_bytes, size_t *total_bytes);

    /* Timing events (cpu: wall clock). */
    ws_status (*event_create)(ws_device *d, ws_event **out);
    ws_status (*event_record)(ws_device *d, ws_event *e);
    ws_status (*event_elapsed_ms)(ws_device *d, ws_event *start, ws_event *end, double *ms);
    void (*event_destroy)(ws_device *d, ws_event *e);

    /* Virtual memory for sleepable pools: reserve an address range once, then
     * map and unmap physical memory inside it; addresses stay stable. */
    size_t (*vm_granularity)(ws_device *d);
    ws_status (*vm_reserve)(ws_device *d, size_t bytes, void **va);
    ws_status (*vm_map)(ws_device *d, void *va, size_t bytes);   /* backs [va, va+bytes) */
    ws_status (*vm_unmap)(ws_device *d, void *va, size_t bytes); /* gives the memory back */
    void (*vm_release)(ws_device *d, void *va, size_t bytes);
    /* Optional (may be NULL where vm_map backs memory at once, as on cuda):
     * makes [va, va+bytes) of a mapped range resident before a copy fills
     * it, instead of the copy faulting it in page by page. Best effort. */
    void (*vm_populate)(ws_device *d, void *va, size_t bytes);

    /* Optional (may be NULL): the native queue that orders this device's
     * work (a cudaStream_t on cuda), so collectives (comm_nccl.c) can be
     * enqueued behind it. NULL: comm uses the legacy default stream and
     * synchronizes the device around each collective. */
    void *(*native_stream)(ws_device *d);

    /* Optional (NULL: the device cannot share memory with another process):
     * memory another process maps through an opaque handle of
     * WS_IPC_HANDLE_BYTES (cuda: cudaMalloc'ed, never the virtual memory
     * API's or a stream-ordered pool's, with cudaIpcGetMemHandle), its
     * release, and the mapping of such a handle here (cudaIpcOpenMemHandle)
     * and its release. Server mode's slots on a GPU (remote.h). */
    ws_status (*ipc_alloc)(ws_device *d, size_t bytes, void **out, unsigned char *handle);
    void (*ipc_free)(ws_device *d, void *ptr, size_t bytes);
    ws_status (*ipc_open)(ws_device *d, const unsigned char *handle, size_t bytes, void **out);
    void (*ipc_close)(ws_device *d, void *ptr);
} ws_device_ops;

#define WS_IPC_HANDLE_BYTES 64

struct ws_device {
    const ws_device_ops *ops;
    ws_device_kind kind;
    int index;          /* cuda ordinal; 0 for cpu */
    char name[64];      /* "cpu", "cuda:0" */
    char description[160]; /* "NVIDIA H200 (sm_90, 139.8 GiB)", "host memory, 2 threads" */
    size_t held;        /* bytes wshost holds on this device (device memory + pools) */
    size_t peak;        /* high-water mark of held */
    size_t host_held;   /* pinned host bytes allocated through this device */
    void *impl;         /* backend state */
};

/* The registry. Devices live for the whole process; never freed by callers. */
ws_device *ws_device_cpu(void);
/* Looks up "cpu", "cuda", "cuda:N". Unknown or unusable: WS_ERR_DEVICE with a
 * message that says why (no driver, no GPU, ordinal out of range). */
ws_status ws_device_get(const char *name, ws_device **out);
int ws_device_cuda_count(void); /* usable GPUs; 0 without driver */
/* Why there is no usable GPU ("no CUDA driver", "built without CUDA"), or NULL. */
const char *ws_device_cuda_unavailable_reason(void);
/* The first usable GPU, else the cpu. `why` (may be NULL) explains the choice. */
ws_device *ws_device_default(const char **why);

/* Accounting helpers the backends call. */
void ws_device_account(ws_device *d, ptrdiff_t delta_bytes);
void ws_device_reset_peak(ws_device *d);
ws_status ws_device_mem_info(ws_device *d, ws_mem_info *out);
ws_status ws_device_synchronize(ws_device *d);
/* Whether wshost has used the device yet (so a wait on it means something). */
int ws_device_in_use(const ws_device *d);

/* Backends register themselves (called from device.c). */
const ws_device_ops *ws_cpu_ops(void);
#ifdef WS_HAVE_CUDA
/* Probes the driver once; returns the number of usable GPUs and fills
 * `devices` (up to max) or sets *reason. */
int ws_cuda_probe(ws_device *devices, int max, const char **reason);
#endif

/* Layout helpers. */
int64_t ws_layout_numel(const ws_layout *l);
int ws_layout_is_contiguous(const ws_layout *l);
void ws_layout_contiguous(ws_layout *l, int ndim, const int64_t *shape);

#endif
