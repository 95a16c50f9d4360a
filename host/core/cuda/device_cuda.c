/* device_cuda.c: the cuda device backend (ws_device_ops for NVIDIA GPUs).
 *
 * The CUDA runtime is linked statically (the driver API, used only for
 * virtual memory, is reached through the runtime's entry points), so the same
 * binary starts on a machine without a driver; ws_cuda_probe then reports
 * zero GPUs and why.
 *
 * Per GPU (set up on first use, so a rank only touches the GPUs it uses):
 *   - a compute stream: kernels, device-to-device copies, allocation;
 *   - a copy stream for host<->device transfers, ordered after earlier
 *     compute work with an event, and the compute stream waits for it, so all
 *     work on a device behaves as one queue (device.h);
 *   - a stream-ordered memory pool (cudaMallocFromPoolAsync) that keeps a
 *     little memory for reuse and returns the rest at synchronization;
 *   - virtual memory for sleepable pools (device_cuda_vm.c).
 * Operations that touch host memory finish before they return; device-only
 * work stays asynchronous until ws_device_synchronize. A table of the ranges
 * this backend allocated tells device memory from host memory without a
 * driver call per pointer. Accounting: alloc/free count toward d->held,
 * host_alloc toward d->host_held; pool.c accounts its own vm mappings. */
#include "device_cuda_internal.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "env.h"
#include "quant_block.h"
#include "quant_kernels.h"

#define MAX_GPUS 64
/* Freed memory the stream-ordered pool keeps for reuse past a synchronize;
 * the rest goes back to the driver (and to other processes on the GPU). */
#define POOL_KEEP_BYTES ((uint64_t)256 << 20)
/* Plain copies at least this large go to the copy engine (host side) or to
 * cudaMemcpyAsync (device to device) instead of the batched kernel. Measured
 * on the H200 with 1.7B and 8B syncs: any threshold from 4 to 64 MiB gives
 * the same 0.84-0.86x of a raw cudaMemcpy; 1 MiB drops to 0.25x, since one
 * call per small tensor costs more than the copy. */
#define PINNED_DMA_MIN_BYTES ((size_t)256 << 10)
#define D2D_MEMCPY_MIN_BYTES ((size_t)16 << 20)
/* D2D_MEMCPY_MIN_BYTES unless WSHOST_CUDA_MEMCPY_MIN_BYTES says otherwise (read
 * when a GPU is first set up), so the benchmarks can measure where the batched
 * kernel stops paying off. */
static size_t d2d_memcpy_min_bytes = D2D_MEMCPY_MIN_BYTES;

/* Host staging for pageable conversions is done in chunks of this size. */
#define STAGE_CHUNK_BYTES ((size_t)64 << 20)
/* Pinned memory every GPU can use, mapped so kernels may read it directly. */
#define PINNED_FLAGS (cudaHostAllocPortable | cudaHostAllocMapped)

/* ---- errors ------------------------------------------------------------------ */

/* Records a failed runtime call; clears the runtime's last error so the next
 * unrelated call does not see it. */
ws_status ws_cuda_fail(const ws_device *d, cudaError_t e, const char *file, int line,
                       const char *fmt, ...)
{
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    cudaGetLastError();
    return ws_seterr(WS_ERR_DEVICE, file, line, "%s: %s failed: %s (%s)", d->name, what,
                     cudaGetErrorString(e), cudaGetErrorName(e));
}

/* ---- which memory is which ------------------------------------------------------ */

typedef struct mem_range {
    uintptr_t base;
    size_t size;
    mem_loc loc;
} mem_range;

static struct {
    pthread_mutex_t lock;
    mem_range *v;
    size_t n, cap;
} ranges = {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0};

/* Index of the first range whose base is above p. */
static size_t ranges_upper(uintptr_t p)
{
    size_t lo = 0, hi = ranges.n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ranges.v[mid].base <= p) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

int ws_cuda_ranges_add(const void *p, size_t size, mem_loc loc)
{
    pthread_mutex_lock(&ranges.lock);
    if (ranges.n == ranges.cap) {
        size_t cap = ranges.cap ? ranges.cap * 2 : 64;
        mem_range *v = realloc(ranges.v, cap * sizeof *v);
        if (!v) {
            pthread_mutex_unlock(&ranges.lock);
            return -1;
        }
        ranges.v = v;
        ranges.cap = cap;
    }
    size_t at = ranges_upper((uintptr_t)p);
    memmove(ranges.v + at + 1, ranges.v + at, (ranges.n - at) * sizeof *ranges.v);
    ranges.v[at] = (mem_range){(uintptr_t)p, size, loc};
    ranges.n++;
    pthread_mutex_unlock(&ranges.lock);
    return 0;
}

void ws_cuda_ranges_remove(const void *p)
{
    pthread_mutex_lock(&ranges.lock);
    size_t at = ranges_upper((uintptr_t)p);
    if (at > 0 && ranges.v[at - 1].base == (uintptr_t)p) {
        memmove(ranges.v + at - 1, ranges.v + at, (ranges.n - at) * sizeof *ranges.v);
        ranges.n--;
    }
    pthread_mutex_unlock(&ranges.lock);
}

/* Device memory (ours or any other CUDA allocation), pinned host memory (the
 * GPU can read it directly), or ordinary pageable host memory. */
static mem_loc locate(const void *p)
{
    uintptr_t u = (uintptr_t)p;
    pthread_mutex_lock(&ranges.lock);
    size_t at = ranges_upper(u);
    int found = at > 0 && u - ranges.v[at - 1].base < ranges.v[at - 1].size;
    mem_loc loc = found ? ranges.v[at - 1].loc : LOC_PAGEABLE;
    pthread_mutex_unlock(&ranges.lock);
    if (found) return loc;
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return LOC_PAGEABLE;
    }
    if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) return LOC_DEVICE;
    return a.type == cudaMemoryTypeHost ? LOC_PINNED : LOC_PAGEABLE;
}

/* ---- per-GPU state ---------------------------------------------------------------- */

static cuda_dev gpus[MAX_GPUS];
static int gpu_count;
static char probe_reason[256];
static pthread_once_t probe_once = PTHREAD_ONCE_INIT;

static cudaError_t dev_malloc(cuda_dev *c, void **p, size_t bytes)
{
    if (c->pool) return cudaMallocFromPoolAsync(p, bytes, c->pool, c->compute);
    return cudaMalloc(p, bytes);
}

static void dev_free(cuda_dev *c, void *p)
{
    if (!p) return;
    if (c->pool) cudaFreeAsync(p, c->compute);
    else cudaFree(p);
}

static void teardown(cuda_dev *c)
{
    if (c->dev_sum) cudaFree(c->dev_sum);
    if (c->host_sum) cudaFreeHost(c->host_sum);
    if (c->pool) cudaMemPoolDestroy(c->pool);
    if (c->ev_compute) cudaEventDestroy(c->ev_compute);
    if (c->ev_copy) cudaEventDestroy(c->ev_copy);
    for (int i = 0; i < 2; i++)
        if (c->ev_upload[i]) cudaEventDestroy(c->ev_upload[i]);
    if (c->compute) cudaStreamDestroy(c->compute);
    if (c->copy) cudaStreamDestroy(c->copy);
    c->dev_sum = NULL;
    c->host_sum = NULL;
    c->pool = NULL;
    c->ev_compute = c->ev_copy = c->ev_upload[0] = c->ev_upload[1] = NULL;
    c->compute = c->copy = NULL;
    cudaGetLastError();
}

static ws_status init_streams_and_pool(ws_device *d, cuda_dev *c)
{
    WS_TRY(ws_env_cuda_memcpy_min_bytes(&d2d_memcpy_min_bytes, D2D_MEMCPY_MIN_BYTES));
    CU_TRY(d, cudaSetDevice(c->ordinal), "selecting the GPU");
    CU_TRY(d, cudaStreamCreateWithFlags(&c->compute, cudaStreamNonBlocking),
           "creating the compute stream");
    CU_TRY(d, cudaStreamCreateWithFlags(&c->copy, cudaStreamNonBlocking),
           "creating the copy stream");
    CU_TRY(d, cudaEventCreateWithFlags(&c->ev_compute, cudaEventDisableTiming), "creating events");
    CU_TRY(d, cudaEventCreateWithFlags(&c->ev_copy, cudaEventDisableTiming), "creating events");
    for (int i = 0; i < 2; i++)
        CU_TRY(d, cudaEventCreateWithFlags(&c->ev_upload[i], cudaEventDisableTiming),
               "creating events");
    int pools = 0;
    CU_TRY(d, cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, c->ordinal),
           "querying memory pool support");
    if (pools) {
        struct cudaMemPoolProps props;
        memset(&props, 0, sizeof props);
        props.allocType = cudaMemAllocationTypePinned;
        props.location.type = cudaMemLocationTypeDevice;
        props.location.id = c->ordinal;
        CU_TRY(d, cudaMemPoolCreate(&c->pool, &props), "creating the memory pool");
        uint64_t keep = POOL_KEEP_BYTES;
        CU_TRY(d, cudaMemPoolSetAttribute(c->pool, cudaMemPoolAttrReleaseThreshold, &keep),
               "setting the memory pool's release threshold");
    }
    CU_TRY(d, cudaMalloc((void **)&c->dev_sum, sizeof *c->dev_sum), "allocating scratch memory");
    CU_TRY(d, cudaHostAlloc((void **)&c->host_sum, sizeof *c->host_sum, PINNED_FLAGS),
           "allocating pinned scratch memory");
    c->granularity = ws_cuda_vm_min_granularity(c->ordinal);
    return WS_OK;
}

/* Selects the GPU for this thread, setting it up on first use. */
ws_status ws_cuda_prep(ws_device *d, cuda_dev **out)
{
    cuda_dev *c = d->impl;
    if (!atomic_load(&c->ready)) {
        pthread_mutex_lock(&c->lock);
        ws_status rc = WS_OK;
        if (!atomic_load(&c->ready)) {
            rc = init_streams_and_pool(d, c);
            if (rc == WS_OK) atomic_store(&c->ready, 1);
            else teardown(c);
        }
        pthread_mutex_unlock(&c->lock);
        if (rc != WS_OK) {
            ws_errprefix("initializing %s (%s)", d->name, c->gpu_name);
            return rc;
        }
    }
    CU_TRY(d, cudaSetDevice(c->ordinal), "selecting the GPU");
    *out = c;
    return WS_OK;
}

cudaStream_t ws_cuda_stream(ws_device *d)
{
    cuda_dev *c;
    if (!d || d->kind != WS_DEVICE_CUDA || ws_cuda_prep(d, &c) != WS_OK) return NULL;
    return c->compute;
}

/* For collectives (NCCL) that must run in order with this device's work. */
static void *cuda_native_stream(ws_device *d) { return (void *)ws_cuda_stream(d); }

ws_status ws_cuda_out_of_memory(ws_device *d, size_t bytes, const char *what)
{
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) cudaGetLastError();
    char want[32], fr[32], tot[32], held[32];
    ws_format_bytes(want, sizeof want, bytes);
    ws_format_bytes(fr, sizeof fr, free_b);
    ws_format_bytes(tot, sizeof tot, total_b);
    ws_format_bytes(held, sizeof held, d->held);
    return WS_ERR(WS_ERR_NOMEM,
                  "%s: out of memory %s %s (%zu bytes): the GPU has %s free of %s and wshost "
                  "holds %s; free tensors, use smaller buckets, or put a pool to sleep",
                  d->name, what, want, bytes, fr, tot, held);
}

/* ---- memory ------------------------------------------------------------------------ */

static ws_status cuda_alloc(ws_device *d, size_t bytes, void **out)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    size_t n = bytes ? bytes : 1;
    void *p = NULL;
    cudaError_t e = dev_malloc(c, &p, n);
    if (e == cudaErrorMemoryAllocation) {
        /* Memory the pool keeps for reuse may be what is missing. */
        cudaGetLastError();
        cudaStreamSynchronize(c->compute);
        if (c->pool) cudaMemPoolTrimTo(c->pool, 0);
        e = dev_malloc(c, &p, n);
    }
    if (e != cudaSuccess) {
        /* Some runtimes reject sizes beyond the GPU with another code. */
        size_t free_b = 0, total_b = 0;
        cudaGetLastError();
        if (e == cudaErrorMemoryAllocation ||
            (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && bytes > free_b)) {
            cudaGetLastError();
            return ws_cuda_out_of_memory(d, bytes, "allocating");
        }
    }
    if (e != cudaSuccess) return ws_cuda_fail(d, e, __FILE__, __LINE__, "allocating %zu bytes", bytes);
    if (ws_cuda_ranges_add(p, n, LOC_DEVICE) != 0) {
        dev_free(c, p);
        return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory recording an allocation", d->name);
    }
    ws_device_account(d, (ptrdiff_t)bytes);
    *out = p;
    return WS_OK;
}

static void cuda_free(ws_device *d, void *ptr, size_t bytes)
{
    cuda_dev *c;
    if (!ptr) return;
    ws_cuda_ranges_remove(ptr);
    if (ws_cuda_prep(d, &c) != WS_OK) return;
    dev_free(c, ptr);
    ws_device_account(d, -(ptrdiff_t)bytes);
}

static ws_status cuda_host_alloc(ws_device *d, size_t bytes, void **out)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    void *p = NULL;
    cudaError_t e = cudaHostAlloc(&p, bytes ? bytes : 1, PINNED_FLAGS);
    if (e != cudaSuccess) {
        char b[32];
        ws_format_bytes(b, sizeof b, bytes);
        cudaGetLastError();
        return WS_ERR(WS_ERR_NOMEM,
                      "%s: cannot allocate %s of pinned host memory: %s; pin less (smaller "
                      "buckets) or raise the locked-memory limit (ulimit -l)",
                      d->name, b, cudaGetErrorString(e));
    }
    if (ws_cuda_ranges_add(p, bytes ? bytes : 1, LOC_PINNED) != 0) {
        cudaFreeHost(p);
        return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory recording an allocation", d->name);
    }
    d->host_held += bytes;
    *out = p;
    return WS_OK;
}

static void cuda_host_free(ws_device *d, void *ptr, size_t bytes)
{
    if (!ptr) return;
    ws_cuda_ranges_remove(ptr);
    cudaFreeHost(ptr);
    cudaGetLastError();
    d->host_held -= bytes;
}

/* ---- ordering between the two streams ------------------------------------------ */

/* Copy-stream work issued after this waits for all compute work so far. */
static ws_status copy_after_compute(ws_device *d, cuda_dev *c)
{
    CU_TRY(d, cudaEventRecord(c->ev_compute, c->compute), "ordering a transfer");
    CU_TRY(d, cudaStreamWaitEvent(c->copy, c->ev_compute, 0), "ordering a transfer");
    return WS_OK;
}

/* Later compute work waits for the copy stream; the host waits for it too,
 * because the transfers touched host memory. */
static ws_status finish_copies(ws_device *d, cuda_dev *c)
{
    CU_TRY(d, cudaEventRecord(c->ev_copy, c->copy), "ordering a transfer");
    CU_TRY(d, cudaStreamWaitEvent(c->compute, c->ev_copy, 0), "ordering a transfer");
    CU_TRY(d, cudaStreamSynchronize(c->copy), "waiting for a host transfer");
    return WS_OK;
}

static const char *direction(mem_loc dst, mem_loc src)
{
    if (dst == LOC_DEVICE) return src == LOC_DEVICE ? "device to device" : "host to device";
    return src == LOC_DEVICE ? "device to host" : "host to host";
}

static ws_status copy_bytes(ws_device *d, cuda_dev *c, void *dst, mem_loc ld, const void *src,
                            mem_loc ls, size_t bytes)
{
    if (ld != LOC_DEVICE && ls != LOC_DEVICE) {
        memmove(dst, src, bytes);
        return WS_OK;
    }
    if (ld == LOC_DEVICE && ls == LOC_DEVICE) {
        CU_TRY(d, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->compute),
               "copying %zu bytes device to device", bytes);
        return WS_OK;
    }
    WS_TRY(copy_after_compute(d, c));
    CU_TRY(d, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->copy),
           "copying %zu bytes %s", bytes, direction(ld, ls));
    return finish_copies(d, c);
}

static ws_status cuda_copy(ws_device *d, void *dst, const void *src, size_t bytes)
{
    cuda_dev *c;
    if (bytes == 0) return WS_OK;
    WS_TRY(ws_cuda_prep(d, &c));
    return copy_bytes(d, c, dst, locate(dst), src, locate(src), bytes);
}

/* ---- batched copies ---------------------------------------------------------------- */

enum desc_route {
    R_SKIP = 0,
    R_KERNEL,      /* the one batched launch */
    R_D2D_MEMCPY,  /* huge plain device copy */
    R_DMA,         /* plain host<->device copy on the copy stream */
    R_HOST,        /* both sides host memory */
    R_STAGED_H2D,  /* pageable source converted on the host, then sent */
    R_STAGED_D2H,  /* raw bytes fetched, then converted on the host */
};

static int route_desc(const ws_copy_desc *x, int *touches_host)
{
    if (x->count == 0) return R_SKIP;
    mem_loc ld = locate(x->dst), ls = locate(x->src);
    int plain = x->dst_dtype == x->src_dtype;
    size_t bytes = x->count * ws_dtype_size(x->src_dtype);
    if (ld != LOC_DEVICE && ls != LOC_DEVICE) return R_HOST;
    if (ld == LOC_DEVICE && ls == LOC_DEVICE)
        return plain && bytes >= d2d_memcpy_min_bytes ? R_D2D_MEMCPY : R_KERNEL;
    mem_loc host = ld == LOC_DEVICE ? ls : ld;
    if (plain && (host == LOC_PAGEABLE || bytes >= PINNED_DMA_MIN_BYTES)) return R_DMA;
    if (host == LOC_PINNED) {
        *touches_host = 1; /* the kernel reads or writes pinned memory directly */
        return R_KERNEL;
    }
    return ld == LOC_DEVICE ? R_STAGED_H2D : R_STAGED_D2H;
}

static ws_status check_desc(const ws_device *d, const ws_copy_desc *x, size_t i)
{
    if ((unsigned)x->dst_dtype >= WS_DTYPE_COUNT || (unsigned)x->src_dtype >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "%s: copy_batch descriptor %zu has an invalid dtype", d->name, i);
    if (x->count && (!x->dst || !x->src))
        return WS_ERR(WS_ERR_ARG, "%s: copy_batch descriptor %zu has a NULL pointer", d->name, i);
    if (x->dst_dtype != x->src_dtype &&
        ((uintptr_t)x->dst % ws_dtype_size(x->dst_dtype) ||
         (uintptr_t)x->src % ws_dtype_size(x->src_dtype)))
        return WS_ERR(WS_ERR_ARG,
                      "%s: copy_batch descriptor %zu converts %s to %s between pointers not "
                      "aligned to their element size; align tensor offsets to elements",
                      d->name, i, ws_dtype_name(x->src_dtype), ws_dtype_name(x->dst_dtype));
    return WS_OK;
}

/* Grows the descriptor buffers (pinned staging and device copy) to n. */
/* Waits until the upload that last read host descriptor buffer `slot` is done. */
static ws_status wait_upload(ws_device *d, cuda_dev *c, int slot)
{
    if (!c->upload_pending[slot]) return WS_OK;
    CU_TRY(d, cudaEventSynchronize(c->ev_upload[slot]), "waiting for a descriptor upload");
    c->upload_pending[slot] = 0;
    return WS_OK;
}

static ws_status reserve_descs(ws_device *d, cuda_dev *c, size_t n)
{
    WS_TRY(wait_upload(d, c, c->desc_slot));
    if (n <= c->descs_cap) return WS_OK;
    WS_TRY(wait_upload(d, c, c->desc_slot ^ 1));
    size_t cap = c->descs_cap * 2 > n ? c->descs_cap * 2 : n;
    if (cap < 256) cap = 256;
    for (int i = 0; i < 2; i++) {
        if (c->host_descs[i]) cudaFreeHost(c->host_descs[i]);
        c->host_descs[i] = NULL;
    }
    dev_free(c, c->dev_descs);
    c->dev_descs = NULL;
    c->descs_cap = 0;
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < 2 && e == cudaSuccess; i++)
        e = cudaHostAlloc((void **)&c->host_descs[i], cap * sizeof(ws_cuda_desc), PINNED_FLAGS);
    if (e == cudaSuccess) e = dev_malloc(c, (void **)&c->dev_descs, cap * sizeof(ws_cuda_desc));
    if (e != cudaSuccess) {
        for (int i = 0; i < 2; i++) {
            if (c->host_descs[i]) cudaFreeHost(c->host_descs[i]);
            c->host_descs[i] = NULL;
        }
        c->dev_descs = NULL;
        return ws_cuda_fail(d, e, __FILE__, __LINE__, "allocating room for %zu copy descriptors", n);
    }
    c->descs_cap = cap;
    return WS_OK;
}

/* Every kernel-routed descriptor in one launch. The device descriptor buffer
 * is reused in stream order (an upload waits for the previous kernel); the
 * host side alternates between two buffers. */
static ws_status launch_kernel_descs(ws_device *d, cuda_dev *c, const ws_copy_desc *descs,
                                     const unsigned char *route, size_t n, size_t nk)
{
    WS_TRY(reserve_descs(d, c, nk));
    int slot = c->desc_slot;
    ws_cuda_desc *host = c->host_descs[slot];
    uint64_t units = 0;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (route[i] != R_KERNEL) continue;
        ws_cuda_desc *x = &host[k++];
        int plain = descs[i].dst_dtype == descs[i].src_dtype;
        x->dst = descs[i].dst;
        x->src = descs[i].src;
        x->count = plain ? descs[i].count * ws_dtype_size(descs[i].src_dtype) : descs[i].count;
        x->dst_dtype = (int32_t)descs[i].dst_dtype;
        x->src_dtype = (int32_t)descs[i].src_dtype;
        x->unit_begin = units;
        units += ws_cuda_desc_units(x);
    }
    CU_TRY(d, cudaMemcpyAsync(c->dev_descs, host, nk * sizeof(ws_cuda_desc),
                              cudaMemcpyHostToDevice, c->compute),
           "uploading %zu copy descriptors", nk);
    CU_TRY(d, cudaEventRecord(c->ev_upload[slot], c->compute), "uploading copy descriptors");
    c->upload_pending[slot] = 1;
    c->desc_slot = slot ^ 1;
    CU_TRY(d, ws_cuda_copy_batch(c->dev_descs, nk, units, c->sm_count, c->compute),
           "launching a batched copy of %zu descriptors", nk);
    return WS_OK;
}

/* Pageable host memory with a conversion: the host converts (bit-identical to
 * the GPU), the copy engine moves raw bytes, chunk by chunk. */
static ws_status staged_convert(ws_device *d, cuda_dev *c, const ws_copy_desc *x, int to_device)
{
    size_t ds = ws_dtype_size(x->dst_dtype), ss = ws_dtype_size(x->src_dtype);
    size_t chunk = STAGE_CHUNK_BYTES / (ds > ss ? ds : ss);
    size_t tmp_elem = to_device ? ds : ss;
    void *tmp = malloc((x->count < chunk ? x->count : chunk) * tmp_elem);
    if (!tmp) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory staging a conversion", d->name);
    ws_status rc = WS_OK;
    for (size_t done = 0; done < x->count && rc == WS_OK; done += chunk) {
        size_t k = x->count - done < chunk ? x->count - done : chunk;
        cudaError_t e;
        if (to_device) {
            ws_convert_host(tmp, x->dst_dtype, (const char *)x->src + done * ss, x->src_dtype, k);
            e = cudaMemcpyAsync((char *)x->dst + done * ds, tmp, k * ds, cudaMemcpyDefault,
                                c->copy);
            if (e == cudaSuccess) e = cudaStreamSynchronize(c->copy);
        } else {
            e = cudaMemcpyAsync(tmp, (const char *)x->src + done * ss, k * ss, cudaMemcpyDefault,
                                c->copy);
            if (e == cudaSuccess) e = cudaStreamSynchronize(c->copy);
            if (e == cudaSuccess)
                ws_convert_host((char *)x->dst + done * ds, x->dst_dtype, tmp, x->src_dtype, k);
        }
        if (e != cudaSuccess)
            rc = ws_cuda_fail(d, e, __FILE__, __LINE__, "converting %s to %s %s",
                           ws_dtype_name(x->src_dtype), ws_dtype_name(x->dst_dtype),
                           to_device ? "host to device" : "device to host");
    }
    free(tmp);
    return rc;
}

static ws_status run_batch(ws_device *d, cuda_dev *c, const ws_copy_desc *descs, size_t n,
                           unsigned char *route)
{
    size_t nk = 0, ncopy = 0;
    int touches_host = 0;
    for (size_t i = 0; i < n; i++) {
        route[i] = (unsigned char)route_desc(&descs[i], &touches_host);
        nk += route[i] == R_KERNEL;
        ncopy += route[i] == R_DMA || route[i] == R_STAGED_H2D || route[i] == R_STAGED_D2H;
    }
    /* Descriptors are independent, so the copy stream only needs to wait for
     * work issued before this batch and overlaps with the kernel below. */
    if (ncopy) WS_TRY(copy_after_compute(d, c));
    if (nk) WS_TRY(launch_kernel_descs(d, c, descs, route, n, nk));
    for (size_t i = 0; i < n; i++) {
        const ws_copy_desc *x = &descs[i];
        size_t bytes = x->count * ws_dtype_size(x->src_dtype);
        switch (route[i]) {
        case R_D2D_MEMCPY:
            CU_TRY(d, cudaMemcpyAsync(x->dst, x->src, bytes, cudaMemcpyDefault, c->compute),
                   "copy_batch descriptor %zu: copying %zu bytes device to device", i, bytes);
            break;
        case R_DMA:
            CU_TRY(d, cudaMemcpyAsync(x->dst, x->src, bytes, cudaMemcpyDefault, c->copy),
                   "copy_batch descriptor %zu: copying %zu bytes %s", i, bytes,
                   direction(locate(x->dst), locate(x->src)));
            break;
        case R_HOST: ws_convert_host(x->dst, x->dst_dtype, x->src, x->src_dtype, x->count); break;
        case R_STAGED_H2D: WS_TRY(staged_convert(d, c, x, 1)); break;
        case R_STAGED_D2H: WS_TRY(staged_convert(d, c, x, 0)); break;
        default: break;
        }
    }
    if (ncopy) WS_TRY(finish_copies(d, c));
    if (touches_host)
        CU_TRY(d, cudaStreamSynchronize(c->compute), "waiting for a copy touching host memory");
    return WS_OK;
}

static ws_status cuda_copy_batch(ws_device *d, const ws_copy_desc *descs, size_t n)
{
    cuda_dev *c;
    if (n == 0) return WS_OK;
    for (size_t i = 0; i < n; i++) WS_TRY(check_desc(d, &descs[i], i));
    WS_TRY(ws_cuda_prep(d, &c));
    unsigned char *route = malloc(n);
    if (!route) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory for %zu descriptors", d->name, n);
    pthread_mutex_lock(&c->lock);
    ws_status rc = run_batch(d, c, descs, n, route);
    pthread_mutex_unlock(&c->lock);
    free(route);
    return rc;
}

/* ---- strided copy, fill, random, checksum ------------------------------------- */

static ws_status check_layout(const ws_device *d, const ws_layout *l, const char *what)
{
    if (l->ndim < 0 || l->ndim > WS_MAX_DIMS)
        return WS_ERR(WS_ERR_ARG, "%s: %s layout has %d dims (0..%d allowed)", d->name, what,
                      l->ndim, WS_MAX_DIMS);
    for (int k = 0; k < l->ndim; k++)
        if (l->shape[k] < 0)
            return WS_ERR(WS_ERR_ARG, "%s: %s layout has a negative size", d->name, what);
    return WS_OK;
}

/* Pinned staging buffer of at least `bytes`; caller holds c->lock. */
static ws_status reserve_stage(ws_device *d, cuda_dev *c, size_t bytes)
{
    if (bytes <= c->stage_cap) return WS_OK;
    if (c->stage) cudaFreeHost(c->stage);
    c->stage = NULL;
    c->stage_cap = 0;
    CU_TRY(d, cudaHostAlloc(&c->stage, bytes, PINNED_FLAGS),
           "allocating %zu bytes of pinned staging memory", bytes);
    c->stage_cap = bytes;
    return WS_OK;
}

/* Keeps a small staging buffer for the next call, frees a large one. */
static void trim_stage(cuda_dev *c)
{
    if (c->stage_cap > STAGE_CHUNK_BYTES) {
        cudaFreeHost(c->stage);
        c->stage = NULL;
        c->stage_cap = 0;
    }
}

/* One side is pageable host memory: go through pinned staging, converting on
 * the GPU, with the host doing only the strided gather or scatter. */
static ws_status strided_staged(ws_device *d, cuda_dev *c, void *dst, ws_dtype dt,
                                const ws_layout *dl, const void *src, ws_dtype st,
                                const ws_layout *sl, int src_is_host)
{
    int64_t n = ws_layout_numel(dl);
    /* Contiguous, shaped like dst (the contract gives both layouts one
     * shape), so the GPU side takes the row-wise path. */
    ws_layout flat;
    ws_layout_contiguous(&flat, dl->ndim, dl->shape);
    ws_dtype stage_dt = src_is_host ? st : dt;
    WS_TRY(reserve_stage(d, c, (size_t)n * ws_dtype_size(stage_dt)));
    const ws_device_ops *cpu = ws_cpu_ops();
    ws_status rc = WS_OK;
    if (src_is_host) {
        rc = cpu->copy_strided(ws_device_cpu(), c->stage, st, &flat, src, st, sl);
        if (rc == WS_OK) {
            cudaError_t e = ws_cuda_copy_strided(dst, dt, dl, c->stage, st, &flat, c->sm_count,
                                                 c->compute);
            if (e == cudaSuccess) e = cudaStreamSynchronize(c->compute);
            if (e != cudaSuccess)
                rc = ws_cuda_fail(d, e, __FILE__, __LINE__, "strided copy host to device");
        }
    } else {
        cudaError_t e = ws_cuda_copy_strided(c->stage, dt, &flat, src, st, sl, c->sm_count,
                                             c->compute);
        if (e == cudaSuccess) e = cudaStreamSynchronize(c->compute);
        if (e != cudaSuccess)
            rc = ws_cuda_fail(d, e, __FILE__, __LINE__, "strided copy device to host");
        else
            rc = cpu->copy_strided(ws_device_cpu(), dst, dt, dl, c->stage, dt, &flat);
    }
    trim_stage(c);
    return rc;
}

static ws_status cuda_copy_strided(ws_device *d, void *dst, ws_dtype dt, const ws_layout *dl,
                                   const void *src, ws_dtype st, const ws_layout *sl)
{
    cuda_dev *c;
    WS_TRY(check_layout(d, dl, "destination"));
    WS_TRY(check_layout(d, sl, "source"));
    if ((unsigned)dt >= WS_DTYPE_COUNT || (unsigned)st >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "%s: strided copy with an invalid dtype", d->name);
    int64_t n = ws_layout_numel(dl);
    if (n != ws_layout_numel(sl))
        return WS_ERR(WS_ERR_ARG, "%s: strided copy of %lld elements into %lld", d->name,
                      (long long)ws_layout_numel(sl), (long long)n);
    if (n == 0) return WS_OK;
    WS_TRY(ws_cuda_prep(d, &c));
    mem_loc ld = locate(dst), ls = locate(src);
    if (ld != LOC_DEVICE && ls != LOC_DEVICE)
        return ws_cpu_ops()->copy_strided(ws_device_cpu(), dst, dt, dl, src, st, sl);
    if (dt == st && ws_layout_is_contiguous(dl) && ws_layout_is_contiguous(sl))
        return copy_bytes(d, c, dst, ld, src, ls, (size_t)n * ws_dtype_size(dt));
    if (ld == LOC_PAGEABLE || ls == LOC_PAGEABLE) {
        pthread_mutex_lock(&c->lock);
        ws_status rc = strided_staged(d, c, dst, dt, dl, src, st, sl, ls == LOC_PAGEABLE);
        pthread_mutex_unlock(&c->lock);
        return rc;
    }
    CU_TRY(d, ws_cuda_copy_strided(dst, dt, dl, src, st, sl, c->sm_count, c->compute),
           "launching a strided copy of %lld elements", (long long)n);
    if (ld == LOC_PINNED || ls == LOC_PINNED)
        CU_TRY(d, cudaStreamSynchronize(c->compute), "waiting for a copy touching host memory");
    return WS_OK;
}

static ws_status cuda_fill(ws_device *d, void *ptr, ws_dtype t, size_t count, double value)
{
    cuda_dev *c;
    if (count == 0) return WS_OK;
    if ((unsigned)t >= WS_DTYPE_COUNT) return WS_ERR(WS_ERR_ARG, "%s: fill with an invalid dtype", d->name);
    WS_TRY(ws_cuda_prep(d, &c));
    if (locate(ptr) != LOC_DEVICE) return ws_cpu_ops()->fill(ws_device_cpu(), ptr, t, count, value);
    /* The element's bits come from dtype.c, so both devices store the same value. */
    unsigned char elem[8] = {0};
    ws_store_scalar(elem, t, value);
    uint64_t bits = 0;
    for (int k = 7; k >= 0; k--) bits = bits << 8 | elem[k];
    CU_TRY(d, ws_cuda_fill(ptr, ws_dtype_size(t), bits, count, c->sm_count, c->compute),
           "launching a fill of %zu elements", count);
    return WS_OK;
}

static ws_status cuda_random(ws_device *d, void *ptr, ws_dtype t, size_t count, uint64_t seed,
                             uint64_t first_index, float scale)
{
    cuda_dev *c;
    if (count == 0) return WS_OK;
    if ((unsigned)t >= WS_DTYPE_COUNT) return WS_ERR(WS_ERR_ARG, "%s: random with an invalid dtype", d->name);
    WS_TRY(ws_cuda_prep(d, &c));
    if (locate(ptr) != LOC_DEVICE)
        return ws_cpu_ops()->random(ws_device_cpu(), ptr, t, count, seed, first_index, scale);
    CU_TRY(d, ws_cuda_random(ptr, t, count, seed, first_index, scale, c->sm_count, c->compute),
           "launching a random fill of %zu elements", count);
    return WS_OK;
}

static ws_status cuda_checksum(ws_device *d, const void *ptr, ws_dtype t, const ws_layout *l,
                               uint64_t first_index, ws_dtype as, uint64_t *out)
{
    cuda_dev *c;
    WS_TRY(check_layout(d, l, "checksum"));
    if ((unsigned)t >= WS_DTYPE_COUNT || (unsigned)as >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "%s: checksum with an invalid dtype", d->name);
    if (ws_layout_numel(l) == 0) {
        *out = 0;
        return WS_OK;
    }
    WS_TRY(ws_cuda_prep(d, &c));
    if (locate(ptr) != LOC_DEVICE)
        return ws_cpu_ops()->checksum(ws_device_cpu(), ptr, t, l, first_index, as, out);
    pthread_mutex_lock(&c->lock);
    cudaError_t e = ws_cuda_checksum(ptr, t, l, first_index, as, c->dev_sum, c->sm_count,
                                     c->compute);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(c->host_sum, c->dev_sum, sizeof *c->host_sum, cudaMemcpyDeviceToHost,
                            c->compute);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->compute);
    uint64_t sum = *c->host_sum;
    pthread_mutex_unlock(&c->lock);
    if (e != cudaSuccess)
        return ws_cuda_fail(d, e, __FILE__, __LINE__, "checksum of %lld elements",
                         (long long)ws_layout_numel(l));
    *out = sum;
    return WS_OK;
}

static ws_status cuda_checksum_rows(ws_device *d, const void *ptr, ws_dtype t, int64_t rows,
                                    int64_t cols, uint64_t first_index, uint64_t pitch,
                                    ws_dtype as, uint64_t *out)
{
    cuda_dev *c;
    *out = 0;
    if ((unsigned)t >= WS_DTYPE_COUNT || (unsigned)as >= WS_DTYPE_COUNT)
        return WS_ERR(WS_ERR_ARG, "%s: checksum with an invalid dtype", d->name);
    if (rows <= 0 || cols <= 0) return WS_OK;
    WS_TRY(ws_cuda_prep(d, &c));
    if (locate(ptr) != LOC_DEVICE)
        return ws_cpu_ops()->checksum_rows(ws_device_cpu(), ptr, t, rows, cols, first_index,
                                           pitch, as, out);
    pthread_mutex_lock(&c->lock);
    cudaError_t e = ws_cuda_checksum_rows(ptr, t, rows, cols, first_index, pitch, as, c->dev_sum,
                                          c->sm_count, c->compute);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(c->host_sum, c->dev_sum, sizeof *c->host_sum, cudaMemcpyDeviceToHost,
                            c->compute);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->compute);
    uint64_t sum = *c->host_sum;
    pthread_mutex_unlock(&c->lock);
    if (e != cudaSuccess)
        return ws_cuda_fail(d, e, __FILE__, __LINE__, "checksum of %lld rows of %lld elements",
                            (long long)rows, (long long)cols);
    *out = sum;
    return WS_OK;
}

/* Block-scaled FP8 quantization: the descriptors go up once, one launch
 * covers every tile of every tensor, and the call returns when it is done
 * (it runs once per sync; the sync's timing includes it). */
static ws_status cuda_quantize_fp8_block(ws_device *d, const ws_quant_desc *descs, size_t n)
{
    cuda_dev *c;
    if (n == 0) return WS_OK;
    WS_TRY(ws_cuda_prep(d, &c));
    ws_cuda_quant *host = malloc(n * sizeof *host);
    if (!host) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory for %zu quantization "
                             "descriptors", d->name, n);
    uint64_t tiles = 0;
    for (size_t i = 0; i < n; i++) {
        const ws_quant_desc *x = &descs[i];
        if (locate(x->src) != LOC_DEVICE || locate(x->q) != LOC_DEVICE ||
            locate(x->scale_inv) != LOC_DEVICE) {
            free(host);
            return WS_ERR(WS_ERR_ARG, "%s: quantize_fp8_block item %zu is not in device memory",
                          d->name, i + 1);
        }
        host[i] = (ws_cuda_quant){.src = x->src, .q = x->q, .scale_inv = x->scale_inv,
                                  .rows = x->rows, .cols = x->cols, .tile_begin = tiles,
                                  .src_dtype = (int32_t)x->src_dtype};
        tiles += (uint64_t)x->batch * (uint64_t)((x->rows + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK) *
                 (uint64_t)((x->cols + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK);
    }
    ws_cuda_quant *dev = NULL;
    cudaError_t e = dev_malloc(c, (void **)&dev, n * sizeof *dev);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(dev, host, n * sizeof *dev, cudaMemcpyHostToDevice, c->compute);
    if (e == cudaSuccess) e = ws_cuda_quantize_fp8_block(dev, n, tiles, c->sm_count, c->compute);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->compute);
    if (dev) dev_free(c, dev);
    free(host);
    if (e != cudaSuccess)
        return ws_cuda_fail(d, e, __FILE__, __LINE__, "quantizing %zu tensors to fp8 (%llu tiles)",
                            n, (unsigned long long)tiles);
    return WS_OK;
}

/* ---- synchronization, memory info, events -------------------------------------- */

static ws_status cuda_synchronize(ws_device *d)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    CU_TRY(d, cudaStreamSynchronize(c->copy), "synchronizing (an earlier transfer may have failed)");
    CU_TRY(d, cudaStreamSynchronize(c->compute),
           "synchronizing (an earlier kernel or copy may have failed)");
    return WS_OK;
}

static int cuda_in_use(const ws_device *d)
{
    cuda_dev *c = d->impl;
    return atomic_load(&c->ready) != 0;
}

static ws_status cuda_mem_info(ws_device *d, size_t *free_bytes, size_t *total_bytes)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    CU_TRY(d, cudaMemGetInfo(free_bytes, total_bytes), "querying free memory");
    return WS_OK;
}

struct ws_event {
    cudaEvent_t ev;
};

static ws_status cuda_event_create(ws_device *d, ws_event **out)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    ws_event *e = malloc(sizeof *e);
    if (!e) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory creating an event", d->name);
    cudaError_t r = cudaEventCreate(&e->ev);
    if (r != cudaSuccess) {
        free(e);
        return ws_cuda_fail(d, r, __FILE__, __LINE__, "creating a timing event");
    }
    *out = e;
    return WS_OK;
}

static ws_status cuda_event_record(ws_device *d, ws_event *e)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    /* Copy-stream work is joined into the compute stream, so one stream sees all. */
    CU_TRY(d, cudaEventRecord(e->ev, c->compute), "recording a timing event");
    return WS_OK;
}

static ws_status cuda_event_elapsed_ms(ws_device *d, ws_event *start, ws_event *end, double *ms)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    float f = 0;
    CU_TRY(d, cudaEventSynchronize(end->ev), "waiting for a timing event");
    CU_TRY(d, cudaEventElapsedTime(&f, start->ev, end->ev),
           "measuring between two events (were both recorded?)");
    *ms = f;
    return WS_OK;
}

static void cuda_event_destroy(ws_device *d, ws_event *e)
{
    if (!e) return;
    cudaEventDestroy(e->ev);
    cudaGetLastError();
    free(e);
}

/* ---- memory shared with another process (CUDA IPC) ----------------------------------- */

/* Plain cudaMalloc: neither the stream-ordered pool's memory nor the virtual
 * memory API's can be exported with cudaIpcGetMemHandle. */
static ws_status cuda_ipc_alloc(ws_device *d, size_t bytes, void **out, unsigned char *handle)
{
    cuda_dev *c;
    *out = NULL;
    WS_TRY(ws_cuda_prep(d, &c));
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        return ws_cuda_out_of_memory(d, bytes, "allocating shared slots of");
    }
    CU_TRY(d, e, "allocating %zu bytes to share", bytes);
    cudaIpcMemHandle_t h;
    e = cudaIpcGetMemHandle(&h, p);
    if (e != cudaSuccess) {
        cudaFree(p);
        return ws_cuda_fail(d, e, __FILE__, __LINE__, "exporting %zu bytes (cudaIpcGetMemHandle)",
                            bytes);
    }
    if (ws_cuda_ranges_add(p, bytes ? bytes : 1, LOC_DEVICE) != 0) {
        cudaFree(p);
        return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory recording an allocation", d->name);
    }
    memcpy(handle, &h, sizeof h < WS_IPC_HANDLE_BYTES ? sizeof h : WS_IPC_HANDLE_BYTES);
    ws_device_account(d, (ptrdiff_t)bytes);
    *out = p;
    return WS_OK;
}

static void cuda_ipc_free(ws_device *d, void *ptr, size_t bytes)
{
    cuda_dev *c;
    if (!ptr) return;
    ws_cuda_ranges_remove(ptr);
    if (ws_cuda_prep(d, &c) != WS_OK) return;
    cudaFree(ptr);
    cudaGetLastError();
    ws_device_account(d, -(ptrdiff_t)bytes);
}

static ws_status cuda_ipc_open(ws_device *d, const unsigned char *handle, size_t bytes, void **out)
{
    cuda_dev *c;
    *out = NULL;
    WS_TRY(ws_cuda_prep(d, &c));
    cudaIpcMemHandle_t h;
    memset(&h, 0, sizeof h);
    memcpy(&h, handle, sizeof h < WS_IPC_HANDLE_BYTES ? sizeof h : WS_IPC_HANDLE_BYTES);
    void *p = NULL;
    CU_TRY(d, cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
           "mapping another process's GPU memory (cudaIpcOpenMemHandle)");
    if (ws_cuda_ranges_add(p, bytes ? bytes : 1, LOC_DEVICE) != 0) {
        cudaIpcCloseMemHandle(p);
        return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory recording a mapping", d->name);
    }
    *out = p;
    return WS_OK;
}

static void cuda_ipc_close(ws_device *d, void *ptr)
{
    cuda_dev *c;
    if (!ptr) return;
    ws_cuda_ranges_remove(ptr);
    if (ws_cuda_prep(d, &c) != WS_OK) return;
    cudaIpcCloseMemHandle(ptr);
    cudaGetLastError();
}

/* ---- the vtable and the probe ---------------------------------------------------- */

static const ws_device_ops cuda_ops = {
    .kind_name = "cuda",
    .alloc = cuda_alloc,
    .free = cuda_free,
    .host_alloc = cuda_host_alloc,
    .host_free = cuda_host_free,
    .copy = cuda_copy,
    .copy_batch = cuda_copy_batch,
    .copy_strided = cuda_copy_strided,
    .fill = cuda_fill,
    .random = cuda_random,
    .checksum = cuda_checksum,
    .checksum_rows = cuda_checksum_rows,
    .quantize_fp8_block = cuda_quantize_fp8_block,
    .synchronize = cuda_synchronize,
    .in_use = cuda_in_use,
    .mem_info = cuda_mem_info,
    .event_create = cuda_event_create,
    .event_record = cuda_event_record,
    .event_elapsed_ms = cuda_event_elapsed_ms,
    .event_destroy = cuda_event_destroy,
    .vm_granularity = ws_cuda_vm_granularity,
    .vm_reserve = ws_cuda_vm_reserve,
    .vm_map = ws_cuda_vm_map,
    .vm_unmap = ws_cuda_vm_unmap,
    .vm_release = ws_cuda_vm_release,
    .native_stream = cuda_native_stream,
    .ipc_alloc = cuda_ipc_alloc,
    .ipc_free = cuda_ipc_free,
    .ipc_open = cuda_ipc_open,
    .ipc_close = cuda_ipc_close,
};

static void explain_no_gpu(cudaError_t e)
{
    if (e == cudaErrorInsufficientDriver) {
        /* Either no driver at all or one older than this runtime. */
        void *lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
        if (!lib) {
            snprintf(probe_reason, sizeof probe_reason,
                     "no CUDA driver (libcuda.so.1 not found)");
            return;
        }
        dlclose(lib);
        int drv_ver = 0, rt_ver = 0;
        cudaDriverGetVersion(&drv_ver);
        cudaRuntimeGetVersion(&rt_ver);
        cudaGetLastError();
        snprintf(probe_reason, sizeof probe_reason,
                 "the CUDA driver (CUDA %d.%d) is older than this build's runtime (CUDA %d.%d); "
                 "update the NVIDIA driver",
                 drv_ver / 1000, drv_ver % 1000 / 10, rt_ver / 1000, rt_ver % 1000 / 10);
        return;
    }
    if (e == cudaErrorNoDevice || e == cudaSuccess) {
        snprintf(probe_reason, sizeof probe_reason,
                 "no GPU found (the CUDA driver sees no devices; check CUDA_VISIBLE_DEVICES)");
        return;
    }
    snprintf(probe_reason, sizeof probe_reason, "CUDA is unusable: %s (%s)",
             cudaGetErrorString(e), cudaGetErrorName(e));
}

static void probe_run(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    cudaGetLastError();
    if (e != cudaSuccess || n <= 0) {
        explain_no_gpu(e);
        gpu_count = 0;
        return;
    }
    if (n > MAX_GPUS) n = MAX_GPUS;
    int usable = 0;
    for (int i = 0; i < n; i++) {
        struct cudaDeviceProp prop;
        e = cudaGetDeviceProperties(&prop, i);
        if (e != cudaSuccess) {
            cudaGetLastError();
            break; /* ordinals must stay dense: stop at the first bad one */
        }
        cuda_dev *c = &gpus[usable++];
        memset(c, 0, sizeof *c);
        pthread_mutex_init(&c->lock, NULL);
        c->ordinal = i;
        c->sm_count = prop.multiProcessorCount;
        c->cc_major = prop.major;
        c->cc_minor = prop.minor;
        c->total_mem = prop.totalGlobalMem;
        snprintf(c->gpu_name, sizeof c->gpu_name, "%s", prop.name);
    }
    if (usable == 0) explain_no_gpu(e);
    gpu_count = usable;
}

int ws_cuda_probe(ws_device *devices, int max, const char **reason)
{
    pthread_once(&probe_once, probe_run);
    if (gpu_count == 0) {
        if (reason) *reason = probe_reason;
        return 0;
    }
    int n = gpu_count < max ? gpu_count : max;
    for (int i = 0; i < n; i++) {
        cuda_dev *c = &gpus[i];
        ws_device *d = &devices[i];
        memset(d, 0, sizeof *d);
        d->ops = &cuda_ops;
        d->kind = WS_DEVICE_CUDA;
        d->index = c->ordinal;
        d->impl = c;
        snprintf(d->name, sizeof d->name, "cuda:%d", c->ordinal);
        snprintf(d->description, sizeof d->description, "%.100s (sm_%d%d, %.1f GiB)",
                 c->gpu_name, c->cc_major, c->cc_minor,
                 (double)c->total_mem / (1024.0 * 1024.0 * 1024.0));
    }
    if (reason) *reason = NULL;
    return n;
}
