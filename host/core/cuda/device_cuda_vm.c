/* device_cuda_vm.c: virtual memory for sleepable pools on the cuda backend.
 *
 * A pool reserves its address range once (cuMemAddressReserve) and maps
 * physical memory into it with cuMemCreate + cuMemMap; unmapping releases the
 * physical memory, so cudaMemGetInfo's free memory really goes up while the
 * addresses (and every tensor view into them) stay valid. The driver API is
 * reached only through cudaGetDriverEntryPointByVersion, so the binary starts
 * without a driver; the mappings of each GPU are listed in its cuda_dev,
 * under its lock. */
#include "device_cuda_internal.h"

#include <cudaTypedefs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- driver API through the runtime's entry points ------------------------------ */

static struct {
    PFN_cuMemCreate_v10020 mem_create;
    PFN_cuMemRelease_v10020 mem_release;
    PFN_cuMemAddressReserve_v10020 address_reserve;
    PFN_cuMemAddressFree_v10020 address_free;
    PFN_cuMemMap_v10020 mem_map;
    PFN_cuMemUnmap_v10020 mem_unmap;
    PFN_cuMemSetAccess_v10020 set_access;
    PFN_cuMemGetAllocationGranularity_v10020 granularity;
    PFN_cuGetErrorString_v6000 error_string;
    int ok;
    char why[160];
} drv;
static pthread_once_t drv_once = PTHREAD_ONCE_INIT;

static int drv_sym(const char *name, void *slot, size_t slot_size)
{
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    cudaError_t e = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &q);
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !fn) {
        cudaGetLastError();
        snprintf(drv.why, sizeof drv.why, "the CUDA driver does not provide %s", name);
        return -1;
    }
    memcpy(slot, &fn, slot_size); /* object pointer to function pointer, as dlsym */
    return 0;
}

#define DRV_SYM(field, name) drv_sym(name, &drv.field, sizeof drv.field)

static void drv_load(void)
{
    drv.ok = DRV_SYM(error_string, "cuGetErrorString") == 0 &&
             DRV_SYM(mem_create, "cuMemCreate") == 0 &&
             DRV_SYM(mem_release, "cuMemRelease") == 0 &&
             DRV_SYM(address_reserve, "cuMemAddressReserve") == 0 &&
             DRV_SYM(address_free, "cuMemAddressFree") == 0 &&
             DRV_SYM(mem_map, "cuMemMap") == 0 && DRV_SYM(mem_unmap, "cuMemUnmap") == 0 &&
             DRV_SYM(set_access, "cuMemSetAccess") == 0 &&
             DRV_SYM(granularity, "cuMemGetAllocationGranularity") == 0;
}

static const char *drv_errstr(CUresult r)
{
    const char *s = NULL;
    if (drv.error_string) drv.error_string(r, &s);
    return s ? s : "unknown CUDA driver error";
}

size_t ws_cuda_vm_min_granularity(int ordinal)
{
    pthread_once(&drv_once, drv_load);
    size_t g = 0;
    if (drv.ok) {
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = ordinal;
        if (drv.granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS) g = 0;
    }
    return g ? g : (size_t)2 << 20;
}

/* ---- the vm_* device ops ------------------------------------------------------- */

static ws_status need_vmm(ws_device *d)
{
    pthread_once(&drv_once, drv_load);
    if (!drv.ok)
        return WS_ERR(WS_ERR_UNSUPPORTED,
                      "%s: sleepable pools need CUDA virtual memory management, but %s; update "
                      "the NVIDIA driver",
                      d->name, drv.why);
    return WS_OK;
}

static size_t round_up(size_t v, size_t g) { return (v + g - 1) / g * g; }

size_t ws_cuda_vm_granularity(ws_device *d)
{
    cuda_dev *c;
    if (ws_cuda_prep(d, &c) != WS_OK) return (size_t)2 << 20;
    return c->granularity;
}

ws_status ws_cuda_vm_reserve(ws_device *d, size_t bytes, void **va)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    WS_TRY(need_vmm(d));
    size_t size = round_up(bytes ? bytes : 1, c->granularity);
    CUdeviceptr p = 0;
    CUresult r = drv.address_reserve(&p, size, c->granularity, 0, 0);
    if (r != CUDA_SUCCESS)
        return WS_ERR(WS_ERR_DEVICE, "%s: reserving %zu bytes of GPU address space failed: %s",
                      d->name, size, drv_errstr(r));
    if (ws_cuda_ranges_add((void *)(uintptr_t)p, size, LOC_DEVICE) != 0) {
        drv.address_free(p, size);
        return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory recording a reservation", d->name);
    }
    *va = (void *)(uintptr_t)p;
    return WS_OK;
}

static ws_status map_locked(ws_device *d, cuda_dev *c, uintptr_t va, size_t bytes)
{
    if (c->n_maps == c->cap_maps) {
        size_t cap = c->cap_maps ? c->cap_maps * 2 : 16;
        vm_handle *v = realloc(c->maps, cap * sizeof *v);
        if (!v) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory recording a mapping", d->name);
        c->maps = v;
        c->cap_maps = cap;
    }
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = c->ordinal;
    CUmemGenericAllocationHandle h = 0;
    CUresult r = drv.mem_create(&h, bytes, &prop, 0);
    if (r == CUDA_ERROR_OUT_OF_MEMORY && c->pool) {
        cudaStreamSynchronize(c->compute);
        cudaMemPoolTrimTo(c->pool, 0);
        cudaGetLastError();
        r = drv.mem_create(&h, bytes, &prop, 0);
    }
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return ws_cuda_out_of_memory(d, bytes, "mapping pool memory,");
    if (r != CUDA_SUCCESS)
        return WS_ERR(WS_ERR_DEVICE, "%s: creating %zu bytes of pool memory failed: %s", d->name,
                      bytes, drv_errstr(r));
    r = drv.mem_map(va, bytes, 0, h, 0);
    if (r == CUDA_SUCCESS) {
        CUmemAccessDesc acc;
        memset(&acc, 0, sizeof acc);
        acc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        acc.location.id = c->ordinal;
        acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        r = drv.set_access(va, bytes, &acc, 1);
        if (r != CUDA_SUCCESS) drv.mem_unmap(va, bytes);
    }
    if (r != CUDA_SUCCESS) {
        drv.mem_release(h);
        return WS_ERR(WS_ERR_DEVICE, "%s: mapping %zu bytes at %p failed: %s (is it inside a "
                      "reservation and not mapped already?)", d->name, bytes, (void *)va,
                      drv_errstr(r));
    }
    c->maps[c->n_maps++] = (vm_handle){va, bytes, h};
    return WS_OK;
}

ws_status ws_cuda_vm_map(ws_device *d, void *va, size_t bytes)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    WS_TRY(need_vmm(d));
    if ((uintptr_t)va % c->granularity || bytes % c->granularity || bytes == 0)
        return WS_ERR(WS_ERR_ARG, "%s: vm_map of %zu bytes at %p is not a multiple of the "
                      "granularity (%zu bytes)", d->name, bytes, va, c->granularity);
    pthread_mutex_lock(&c->lock);
    ws_status rc = map_locked(d, c, (uintptr_t)va, bytes);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* Unmaps and releases every mapping inside [va, va+bytes); caller holds the lock. */
static ws_status unmap_locked(ws_device *d, cuda_dev *c, uintptr_t va, size_t bytes)
{
    /* Queued kernels may still touch the range. */
    CU_TRY(d, cudaStreamSynchronize(c->copy), "waiting for work before unmapping");
    CU_TRY(d, cudaStreamSynchronize(c->compute), "waiting for work before unmapping");
    for (size_t i = 0; i < c->n_maps; i++) {
        vm_handle *m = &c->maps[i];
        int inside = m->va >= va && m->va + m->size <= va + bytes;
        int overlaps = m->va < va + bytes && va < m->va + m->size;
        if (overlaps && !inside)
            return WS_ERR(WS_ERR_ARG, "%s: vm_unmap of [%p, +%zu) cuts through a mapping of "
                          "%zu bytes at %p; unmap whole mappings", d->name, (void *)va, bytes,
                          m->size, (void *)m->va);
    }
    size_t kept = 0;
    ws_status rc = WS_OK;
    for (size_t i = 0; i < c->n_maps; i++) {
        vm_handle m = c->maps[i];
        if (!(m.va >= va && m.va + m.size <= va + bytes)) {
            c->maps[kept++] = m;
            continue;
        }
        CUresult r = drv.mem_unmap(m.va, m.size);
        if (r == CUDA_SUCCESS) r = drv.mem_release(m.h);
        if (r != CUDA_SUCCESS && rc == WS_OK)
            rc = WS_ERR(WS_ERR_DEVICE, "%s: unmapping %zu bytes at %p failed: %s", d->name,
                        m.size, (void *)m.va, drv_errstr(r));
    }
    c->n_maps = kept;
    return rc;
}

ws_status ws_cuda_vm_unmap(ws_device *d, void *va, size_t bytes)
{
    cuda_dev *c;
    WS_TRY(ws_cuda_prep(d, &c));
    WS_TRY(need_vmm(d));
    pthread_mutex_lock(&c->lock);
    ws_status rc = unmap_locked(d, c, (uintptr_t)va, bytes);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

void ws_cuda_vm_release(ws_device *d, void *va, size_t bytes)
{
    cuda_dev *c;
    if (!va || ws_cuda_prep(d, &c) != WS_OK || need_vmm(d) != WS_OK) return;
    size_t size = round_up(bytes ? bytes : 1, c->granularity);
    pthread_mutex_lock(&c->lock);
    unmap_locked(d, c, (uintptr_t)va, size);
    drv.address_free((CUdeviceptr)(uintptr_t)va, size);
    pthread_mutex_unlock(&c->lock);
    ws_cuda_ranges_remove(va);
}

