/* quant_kernels.cu: block-scaled FP8 quantization on the GPU.
 *
 * One thread block per 128x128 tile (grid-stride over all tiles of all
 * tensors of the batch): each thread takes one column of the tile and every
 * other row of it, so a warp reads 32 consecutive elements of a row; the
 * tile's amax is a max over the threads (the same value in any order), then
 * every element is quantized with quant_block.h's arithmetic, the source the
 * cpu backend compiles too, so both give the same bits. */
#include "quant_kernels.h"

#include "dtype.h"
#include "quant_block.h"

namespace {

constexpr int kThreads = 256;
constexpr int kRowStep = kThreads / WS_FP8_BLOCK; /* rows a pass of the block covers */

__device__ __forceinline__ float load_src(const void *p, int t, size_t i)
{
    switch (t) {
    case WS_F32: return ((const float *)p)[i];
    case WS_BF16: return ws_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ws_f16_to_f32(((const uint16_t *)p)[i]);
    }
}

__global__ void quantize_kernel(const ws_cuda_quant *descs, int n, uint64_t total_tiles)
{
    __shared__ uint32_t warp_max[kThreads / 32];
    __shared__ float tile_scale;
    const int col = threadIdx.x % WS_FP8_BLOCK, row0 = threadIdx.x / WS_FP8_BLOCK;
    for (uint64_t tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        int lo = 0, hi = n - 1; /* the last descriptor whose tile_begin <= tile */
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (descs[mid].tile_begin <= tile) lo = mid; else hi = mid - 1;
        }
        const ws_cuda_quant x = descs[lo];
        int64_t brows = (x.rows + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
        int64_t bcols = (x.cols + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
        int64_t local = (int64_t)(tile - x.tile_begin);
        int64_t b = local / (brows * bcols), br = local / bcols % brows, bc = local % bcols;
        int64_t r_end = (br + 1) * WS_FP8_BLOCK < x.rows ? (br + 1) * WS_FP8_BLOCK : x.rows;
        int64_t c = bc * WS_FP8_BLOCK + col;
        bool has_col = c < x.cols;
        size_t base = (size_t)(b * x.rows) * (size_t)x.cols;

        uint32_t m = 0;
        if (has_col)
            for (int64_t r = br * WS_FP8_BLOCK + row0; r < r_end; r += kRowStep) {
                uint32_t a = ws_fp8_abs_bits(load_src(x.src, x.src_dtype,
                                                      base + (size_t)(r * x.cols + c)));
                m = a > m ? a : m;
            }
        for (int off = 16; off > 0; off /= 2) {
            uint32_t o = __shfl_xor_sync(0xFFFFFFFFu, m, off);
            m = o > m ? o : m;
        }
        if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t all = 0;
            for (int w = 0; w < kThreads / 32; w++) all = warp_max[w] > all ? warp_max[w] : all;
            tile_scale = ws_fp8_scale_inv(all);
            x.scale_inv[(size_t)((b * brows + br) * bcols + bc)] = tile_scale;
        }
        __syncthreads();
        float s = tile_scale;
        if (has_col)
            for (int64_t r = br * WS_FP8_BLOCK + row0; r < r_end; r += kRowStep) {
                size_t i = base + (size_t)(r * x.cols + c);
                ((uint8_t *)x.q)[i] = ws_fp8_quantize(load_src(x.src, x.src_dtype, i), s);
            }
        __syncthreads(); /* warp_max and tile_scale are reused by the next tile */
    }
}

} // namespace

extern "C" cudaError_t ws_cuda_quantize_fp8_block(const ws_cuda_quant *descs, size_t n,
                                                  uint64_t total_tiles, int sm_count,
                                                  cudaStream_t stream)
{
    if (n == 0 || total_tiles == 0) return cudaSuccess;
    uint64_t grid = (uint64_t)(sm_count > 0 ? sm_count : 1) * 8;
    if (grid > total_tiles) grid = total_tiles;
    quantize_kernel<<<(unsigned)grid, kThreads, 0, stream>>>(descs, (int)n, total_tiles);
    return cudaGetLastError();
}
