/* quant_kernels.h: the CUDA launcher of block-scaled FP8 quantization
 * (internal to the cuda backend; device_cuda.c calls it). */
#ifndef WS_QUANT_KERNELS_H
#define WS_QUANT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One tensor as the kernel reads it (built by device_cuda.c from a
 * ws_quant_desc): `batch` matrices of rows x cols, cut into 128x128 tiles. */
typedef struct ws_cuda_quant {
    const void *src;
    void *q;
    float *scale_inv;
    int64_t rows, cols;
    uint64_t tile_begin; /* first tile of this tensor (prefix sum over earlier ones) */
    int32_t src_dtype;
} ws_cuda_quant;

/* Quantizes `n` tensors (descriptors in device memory, sorted by
 * tile_begin) holding `total_tiles` tiles in one launch: one thread block per
 * tile at a time. */
cudaError_t ws_cuda_quantize_fp8_block(const ws_cuda_quant *descs, size_t n,
                                       uint64_t total_tiles, int sm_count, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
