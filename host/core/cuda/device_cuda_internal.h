/* device_cuda_internal.h: what the cuda backend's files share (internal; not
 * part of the core's contract). device_cuda.c holds the per-GPU setup, copies,
 * kernels and the probe; device_cuda_vm.c the virtual memory of sleepable
 * pools and the driver entry points it needs. */
#ifndef WS_DEVICE_CUDA_INTERNAL_H
#define WS_DEVICE_CUDA_INTERNAL_H

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "cuda_kernels.h"
#include "device.h"
#include "status.h"

/* Which memory a pointer is in (device_cuda.c keeps a table of the ranges
 * this backend allocated or reserved). */
typedef enum mem_loc { LOC_PAGEABLE = 0, LOC_PINNED, LOC_DEVICE } mem_loc;

/* One physical allocation mapped into a sleepable pool's reservation. */
typedef struct vm_handle {
    uintptr_t va;
    size_t size;
    CUmemGenericAllocationHandle h;
} vm_handle;

typedef struct cuda_dev {
    int ordinal, sm_count, cc_major, cc_minor;
    size_t total_mem;
    char gpu_name[256];
    pthread_mutex_t lock; /* init, scratch buffers, the vm handle list */
    atomic_int ready;
    cudaStream_t compute, copy;
    cudaEvent_t ev_compute, ev_copy;
    /* Two pinned descriptor buffers used in turn, so the host fills batch
     * k+1 while the upload of batch k may still be reading its buffer. */
    cudaEvent_t ev_upload[2];
    int upload_pending[2];
    int desc_slot;
    cudaMemPool_t pool; /* NULL where the GPU has no memory pools: cudaMalloc */
    ws_cuda_desc *host_descs[2], *dev_descs;
    size_t descs_cap;
    unsigned long long *dev_sum, *host_sum;
    void *stage;
    size_t stage_cap;
    size_t granularity;
    vm_handle *maps;
    size_t n_maps, cap_maps;
} cuda_dev;

/* Records a failed runtime call (naming the device and what was being done)
 * and returns WS_ERR_DEVICE; use through CU_TRY. */
ws_status ws_cuda_fail(const ws_device *d, cudaError_t e, const char *file, int line,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#define CU_TRY(d, call, ...)                                                             \
    do {                                                                                 \
        cudaError_t cu_e_ = (call);                                                      \
        if (cu_e_ != cudaSuccess) return ws_cuda_fail((d), cu_e_, __FILE__, __LINE__, __VA_ARGS__); \
    } while (0)

/* Selects d's GPU for this thread, setting it up on first use. */
ws_status ws_cuda_prep(ws_device *d, cuda_dev **out);
/* The out-of-memory error: what was wanted, what is free and held. */
ws_status ws_cuda_out_of_memory(ws_device *d, size_t bytes, const char *what);
/* The range table: 0 or -1 when out of host memory. */
int ws_cuda_ranges_add(const void *p, size_t size, mem_loc loc);
void ws_cuda_ranges_remove(const void *p);

/* device_cuda_vm.c: the driver's minimum mapping granularity for a GPU (2 MiB
 * where the driver cannot say), and the vm_* device ops. */
size_t ws_cuda_vm_min_granularity(int ordinal);
size_t ws_cuda_vm_granularity(ws_device *d);
ws_status ws_cuda_vm_reserve(ws_device *d, size_t bytes, void **va);
ws_status ws_cuda_vm_map(ws_device *d, void *va, size_t bytes);
ws_status ws_cuda_vm_unmap(ws_device *d, void *va, size_t bytes);
void ws_cuda_vm_release(ws_device *d, void *va, size_t bytes);

#endif
