/* cuda_kernels.h: C-callable launchers for the CUDA device backend's kernels.
 *
 * Internal to the cuda backend (device_cuda.c calls these; cuda_kernels.cu
 * implements them). Every launcher enqueues on the given stream and returns
 * the launch status; none of them synchronizes. Pointers must be usable by
 * the GPU: device memory, mapped VM ranges, or pinned host memory.
 *
 * Element conversions follow dtype.c bit for bit (float pairs through f32
 * with one round-to-nearest-even step, integers saturating), so a tensor
 * converted on the GPU equals the same tensor converted by ws_convert_host. */
#ifndef WS_CUDA_KERNELS_H
#define WS_CUDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "device.h"
#include "dtype.h"

/* Work units of the batched copy: one block handles one unit at a time, so a
 * batch of many small descriptors and one of a few huge ones both spread over
 * the whole GPU in a single launch. */
#define WS_CUDA_UNIT_BYTES 65536u /* plain copies (dst dtype == src dtype) */
#define WS_CUDA_UNIT_ELEMS 8192u  /* converting copies */

/* One descriptor as the kernel reads it (built by device_cuda.c from a
 * ws_copy_desc). Plain copies carry a byte count, converting ones elements. */
typedef struct ws_cuda_desc {
    void *dst;
    const void *src;
    uint64_t count;      /* bytes when dst_dtype == src_dtype, else elements */
    uint64_t unit_begin; /* first work unit of this descriptor (prefix sum) */
    int32_t dst_dtype;
    int32_t src_dtype;
} ws_cuda_desc;

/* Work units a descriptor needs; its unit_begin is the sum over earlier ones. */
static inline uint64_t ws_cuda_desc_units(const ws_cuda_desc *d)
{
    uint64_t unit = d->dst_dtype == d->src_dtype ? WS_CUDA_UNIT_BYTES : WS_CUDA_UNIT_ELEMS;
    return (d->count + unit - 1) / unit;
}

/* Runs `n` descriptors (already in device memory, sorted by unit_begin) that
 * need `total_units` work units in one launch. */
cudaError_t ws_cuda_copy_batch(const ws_cuda_desc *descs, size_t n, uint64_t total_units,
                               int sm_count, cudaStream_t stream);

/* dst[dl] = convert(src[sl]) element by element in row-major logical order;
 * the two layouts may differ in shape but hold the same number of elements. */
cudaError_t ws_cuda_copy_strided(void *dst, ws_dtype dt, const ws_layout *dl, const void *src,
                                 ws_dtype st, const ws_layout *sl, int sm_count,
                                 cudaStream_t stream);

/* Writes the element bit pattern `bits` (the low elem_size bytes, little
 * endian) to `count` elements. */
cudaError_t ws_cuda_fill(void *ptr, size_t elem_size, uint64_t bits, size_t count,
                         int sm_count, cudaStream_t stream);

/* ptr[i] = ws_random_elem(seed, first_index + i, scale) converted to t. */
cudaError_t ws_cuda_random(void *ptr, ws_dtype t, size_t count, uint64_t seed,
                           uint64_t first_index, float scale, int sm_count,
                           cudaStream_t stream);

/* *sum (device memory) = sum of ws_hash_elem(first_index + i, bits of element
 * i converted to `as`) over the view, mod 2^64. Zeroes *sum first. */
cudaError_t ws_cuda_checksum(const void *ptr, ws_dtype t, const ws_layout *l,
                             uint64_t first_index, ws_dtype as, unsigned long long *sum,
                             int sm_count, cudaStream_t stream);

/* The same over rows x cols contiguous elements, element j of row i hashed
 * with index first_index + i * pitch + j (a block of a larger tensor). */
cudaError_t ws_cuda_checksum_rows(const void *ptr, ws_dtype t, int64_t rows, int64_t cols,
                                  uint64_t first_index, uint64_t pitch, ws_dtype as,
                                  unsigned long long *sum, int sm_count, cudaStream_t stream);

/* Converts n contiguous elements on the GPU (the contiguous case of the
 * strided copy; same result as ws_convert_host). */
cudaError_t ws_cuda_convert(void *dst, ws_dtype dt, const void *src, ws_dtype st, size_t n,
                            int sm_count, cudaStream_t stream);

/* Implemented in device_cuda.c. The compute stream of a cuda device, so other
 * CUDA users in the core (comm_nccl.c) can order their work with the
 * device's queue; initializes the device on first use. NULL if `d` is not a
 * cuda device or it cannot be initialized (ws_errmsg says why). */
cudaStream_t ws_cuda_stream(ws_device *d);

#ifdef __cplusplus
}
#endif

#endif
