/* cuda_kernels.cu: the GPU kernels of the cuda device backend.
 *
 * Batched and strided copies with dtype conversion, fill, deterministic
 * random fill and the shard-composable checksum. The element conversions,
 * the hash and the random stream come straight from dtype_convert.h and
 * dtype.h (compiled here for the device), so a GPU result equals
 * ws_convert_host bit for bit; this file only loads and stores elements and
 * makes the same case split as ws_convert_host. tests/c/test_cuda.c checks
 * every conversion pair over all 16-bit and 8-bit patterns. */
#include "cuda_kernels.h"

#include <string.h>

namespace {

constexpr int kThreads = 256;

/* Element helpers; they work on aligned device pointers, so they load and
 * store through typed pointers rather than memcpy. */
#define HD __host__ __device__ __forceinline__

HD bool is_float(int t)
{
    return t == WS_F32 || t == WS_BF16 || t == WS_F16 || t == WS_FP8E4M3;
}

HD float load_float(const void *p, int t)
{
    switch (t) {
    case WS_F32: return *(const float *)p;
    case WS_BF16: return ws_bf16_to_f32(*(const uint16_t *)p);
    case WS_F16: return ws_f16_to_f32(*(const uint16_t *)p);
    default: return ws_fp8e4m3_to_f32(*(const uint8_t *)p);
    }
}

HD void store_float(void *p, int t, float f)
{
    switch (t) {
    case WS_F32: *(float *)p = f; break;
    case WS_BF16: *(uint16_t *)p = ws_f32_to_bf16(f); break;
    case WS_F16: *(uint16_t *)p = ws_f32_to_f16(f); break;
    default: *(uint8_t *)p = ws_f32_to_fp8e4m3(f); break;
    }
}

HD int64_t load_int(const void *p, int t)
{
    switch (t) {
    case WS_U8: return *(const uint8_t *)p;
    case WS_I32: return *(const int32_t *)p;
    default: return *(const int64_t *)p;
    }
}

HD void store_int(void *p, int t, int64_t v)
{
    switch (t) {
    case WS_U8: *(uint8_t *)p = (uint8_t)ws_sat_int(v, 0, 255); break;
    case WS_I32: *(int32_t *)p = (int32_t)ws_sat_int(v, INT32_MIN, INT32_MAX); break;
    default: *(int64_t *)p = v; break;
    }
}

HD double load_scalar(const void *p, int t)
{
    return is_float(t) ? (double)load_float(p, t) : (double)load_int(p, t);
}

HD void store_scalar(void *p, int t, double v)
{
    switch (t) {
    case WS_U8: *(uint8_t *)p = (uint8_t)ws_sat_from_double(v, 0, 255); break;
    case WS_I32: *(int32_t *)p = (int32_t)ws_sat_from_double(v, INT32_MIN, INT32_MAX); break;
    case WS_I64: *(int64_t *)p = ws_sat_from_double(v, INT64_MIN, INT64_MAX); break;
    default: store_float(p, t, (float)v); break;
    }
}

HD void copy_elem_bits(void *d, const void *s, int t)
{
    switch (t) {
    case WS_F32: case WS_I32: *(uint32_t *)d = *(const uint32_t *)s; break;
    case WS_BF16: case WS_F16: *(uint16_t *)d = *(const uint16_t *)s; break;
    case WS_I64: *(uint64_t *)d = *(const uint64_t *)s; break;
    default: *(uint8_t *)d = *(const uint8_t *)s; break;
    }
}

/* One element, any pair: the same case split as ws_convert_host. */
HD void convert_elem(void *d, int dt, const void *s, int st)
{
    if (dt == st) {
        copy_elem_bits(d, s, dt);
    } else if (is_float(dt) && is_float(st)) {
        store_float(d, dt, load_float(s, st));
    } else if (!is_float(dt) && !is_float(st)) {
        store_int(d, dt, load_int(s, st));
    } else if (st == WS_I64 && dt == WS_F32) {
        *(float *)d = (float)load_int(s, st);
    } else {
        store_scalar(d, dt, load_scalar(s, st));
    }
}

HD uint64_t load_bits(const void *p, int t)
{
    switch (t) {
    case WS_F32: case WS_I32: return *(const uint32_t *)p;
    case WS_BF16: case WS_F16: return *(const uint16_t *)p;
    case WS_I64: return *(const uint64_t *)p;
    default: return *(const uint8_t *)p;
    }
}

HD int dtype_bytes(int t)
{
    switch (t) {
    case WS_F32: case WS_I32: return 4;
    case WS_BF16: case WS_F16: return 2;
    case WS_I64: return 8;
    default: return 1;
    }
}

/* ---- block-wide byte copy ------------------------------------------------------ */

/* All threads of a block copy n bytes in W-byte words (both pointers share
 * their alignment mod W), with byte-wise head and tail. */
template <typename W>
__device__ __forceinline__ void copy_words(uint8_t *d, const uint8_t *s, uint64_t n)
{
    constexpr uint64_t w = sizeof(W);
    uint64_t head = (w - ((uintptr_t)d & (w - 1))) & (w - 1);
    if (head > n) head = n;
    for (uint64_t i = threadIdx.x; i < head; i += blockDim.x) d[i] = s[i];
    uint64_t words = (n - head) / w;
    W *dw = (W *)(d + head);
    const W *sw = (const W *)(s + head);
    for (uint64_t i = threadIdx.x; i < words; i += blockDim.x) dw[i] = sw[i];
    for (uint64_t i = head + words * w + threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

__device__ __forceinline__ void block_copy_bytes(void *dst, const void *src, uint64_t n)
{
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    uintptr_t mis = (uintptr_t)d ^ (uintptr_t)s;
    if ((mis & 15) == 0) copy_words<uint4>(d, s, n);
    else if ((mis & 7) == 0) copy_words<uint2>(d, s, n);
    else if ((mis & 3) == 0) copy_words<uint32_t>(d, s, n);
    else if ((mis & 1) == 0) copy_words<uint16_t>(d, s, n);
    else copy_words<uint8_t>(d, s, n);
}

/* ---- kernels ---------------------------------------------------------------------- */

__global__ void copy_batch_kernel(const ws_cuda_desc *descs, int n, uint64_t total_units)
{
    for (uint64_t u = blockIdx.x; u < total_units; u += gridDim.x) {
        /* The descriptor owning unit u: the last one with unit_begin <= u. */
        int lo = 0, hi = n - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (descs[mid].unit_begin <= u) lo = mid;
            else hi = mid - 1;
        }
        const ws_cuda_desc dsc = descs[lo];
        uint64_t local = u - dsc.unit_begin;
        if (dsc.dst_dtype == dsc.src_dtype) {
            uint64_t begin = local * WS_CUDA_UNIT_BYTES;
            uint64_t end = min(begin + (uint64_t)WS_CUDA_UNIT_BYTES, dsc.count);
            block_copy_bytes((uint8_t *)dsc.dst + begin, (const uint8_t *)dsc.src + begin,
                             end - begin);
        } else {
            uint64_t begin = local * WS_CUDA_UNIT_ELEMS;
            uint64_t end = min(begin + (uint64_t)WS_CUDA_UNIT_ELEMS, dsc.count);
            int ds = dtype_bytes(dsc.dst_dtype), ss = dtype_bytes(dsc.src_dtype);
            for (uint64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
                convert_elem((uint8_t *)dsc.dst + i * ds, dsc.dst_dtype,
                             (const uint8_t *)dsc.src + i * ss, dsc.src_dtype);
        }
    }
}

__global__ void convert_contig_kernel(void *dst, int dt, const void *src, int st, uint64_t n)
{
    int ds = dtype_bytes(dt), ss = dtype_bytes(st);
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x)
        convert_elem((uint8_t *)dst + i * ds, dt, (const uint8_t *)src + i * ss, st);
}

/* Layouts after merging dims that are contiguous with each other. */
struct strided_args {
    int dnd, snd;
    int64_t dshape[WS_MAX_DIMS], dstride[WS_MAX_DIMS];
    int64_t sshape[WS_MAX_DIMS], sstride[WS_MAX_DIMS];
};

HD int64_t elem_offset(uint64_t i, int nd, const int64_t *shape,
                                               const int64_t *stride)
{
    int64_t off = 0;
    for (int k = nd - 1; k > 0; k--) {
        uint64_t dim = (uint64_t)shape[k];
        off += (int64_t)(i % dim) * stride[k];
        i /= dim;
    }
    return off + (nd > 0 ? (int64_t)i * stride[0] : 0);
}

/* Any two layouts of equal numel: index math per element. */
__global__ void strided_kernel(void *dst, int dt, const void *src, int st, strided_args a,
                               uint64_t n)
{
    int ds = dtype_bytes(dt), ss = dtype_bytes(st);
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        int64_t doff = elem_offset(i, a.dnd, a.dshape, a.dstride);
        int64_t soff = elem_offset(i, a.snd, a.sshape, a.sstride);
        convert_elem((uint8_t *)dst + doff * ds, dt, (const uint8_t *)src + soff * ss, st);
    }
}

/* Equal shapes with a long innermost dim: a block takes a chunk of one row,
 * computes the row's offsets once and its threads walk the chunk, so the
 * index math is per chunk rather than per element. */
constexpr uint64_t kRowChunk = 4096;

__global__ void rows_kernel(void *dst, int dt, const void *src, int st, strided_args a,
                            uint64_t rows, uint64_t inner)
{
    int ds = dtype_bytes(dt), ss = dtype_bytes(st);
    int nd = a.dnd;
    int64_t dinner = a.dstride[nd - 1], sinner = a.sstride[nd - 1];
    uint64_t chunks = (inner + kRowChunk - 1) / kRowChunk;
    for (uint64_t u = blockIdx.x; u < rows * chunks; u += gridDim.x) {
        uint64_t r = u / chunks, begin = (u % chunks) * kRowChunk;
        uint64_t end = min(begin + kRowChunk, inner);
        int64_t doff = elem_offset(r, nd - 1, a.dshape, a.dstride) + (int64_t)begin * dinner;
        int64_t soff = elem_offset(r, nd - 1, a.sshape, a.sstride) + (int64_t)begin * sinner;
        uint8_t *drow = (uint8_t *)dst + doff * ds;
        const uint8_t *srow = (const uint8_t *)src + soff * ss;
        if (dt == st && dinner == 1 && sinner == 1) {
            block_copy_bytes(drow, srow, (end - begin) * ds);
            continue;
        }
        for (uint64_t j = threadIdx.x; j < end - begin; j += blockDim.x)
            convert_elem(drow + (int64_t)j * dinner * ds, dt, srow + (int64_t)j * sinner * ss,
                         st);
    }
}

__global__ void copy_bytes_kernel(void *dst, const void *src, uint64_t n)
{
    for (uint64_t u = blockIdx.x; u * WS_CUDA_UNIT_BYTES < n; u += gridDim.x) {
        uint64_t begin = u * WS_CUDA_UNIT_BYTES;
        uint64_t end = min(begin + (uint64_t)WS_CUDA_UNIT_BYTES, n);
        block_copy_bytes((uint8_t *)dst + begin, (const uint8_t *)src + begin, end - begin);
    }
}

/* Writes a 16-byte repetition of the element pattern; head and tail per element. */
__global__ void fill_kernel(uint8_t *p, int es, uint64_t bits, uint64_t count)
{
    uint64_t nbytes = count * es;
    uint64_t head = ((16 - ((uintptr_t)p & 15)) & 15);
    if (head > nbytes) head = nbytes;
    uint64_t words = (nbytes - head) / 16;
    uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    /* Byte b of the buffer holds byte (b mod es) of the element. */
    for (uint64_t i = tid; i < head; i += nthreads) p[i] = (uint8_t)(bits >> (8 * (i % es)));
    uint8_t pat[16];
    for (int k = 0; k < 16; k++) pat[k] = (uint8_t)(bits >> (8 * ((head + k) % es)));
    uint4 v;
    memcpy(&v, pat, 16);
    uint4 *w = (uint4 *)(p + head);
    for (uint64_t i = tid; i < words; i += nthreads) w[i] = v;
    for (uint64_t i = head + words * 16 + tid; i < nbytes; i += nthreads)
        p[i] = (uint8_t)(bits >> (8 * (i % es)));
}

__global__ void random_kernel(void *p, int t, uint64_t count, uint64_t seed, uint64_t first,
                              float scale)
{
    int es = dtype_bytes(t);
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < count;
         i += (uint64_t)gridDim.x * blockDim.x) {
        float f = ws_random_elem(seed, first + i, scale);
        convert_elem((uint8_t *)p + i * es, t, &f, WS_F32);
    }
}

struct checksum_args {
    int nd;
    int contiguous;
    int64_t shape[WS_MAX_DIMS], stride[WS_MAX_DIMS];
    uint64_t cols, pitch; /* cols != 0: element i's index is (i / cols) * pitch + i % cols */
};

__global__ void checksum_kernel(const void *p, int t, checksum_args a, uint64_t n,
                                uint64_t first, int as, unsigned long long *sum)
{
    int es = dtype_bytes(t);
    unsigned long long acc = 0;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        int64_t off = a.contiguous ? (int64_t)i : elem_offset(i, a.nd, a.shape, a.stride);
        const uint8_t *e = (const uint8_t *)p + off * es;
        uint64_t bits;
        if (as == t) {
            bits = load_bits(e, t);
        } else {
            uint64_t conv = 0;
            convert_elem(&conv, as, e, t);
            bits = load_bits(&conv, as);
        }
        uint64_t index = a.cols ? (i / a.cols) * a.pitch + i % a.cols : i;
        acc += ws_hash_elem(first + index, bits);
    }
    /* Unsigned adds wrap mod 2^64 in any order: the CPU sum exactly. */
    for (int o = 16; o > 0; o /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(sum, acc);
}

/* ---- launch helpers ------------------------------------------------------------- */

unsigned grid_for(uint64_t work_items, int sm_count, uint64_t per_block)
{
    uint64_t want = (work_items + per_block - 1) / per_block;
    uint64_t cap = (uint64_t)(sm_count > 0 ? sm_count : 1) * 8;
    if (want > cap) want = cap;
    return (unsigned)(want ? want : 1);
}

/* Merges adjacent dims that are contiguous with each other in BOTH layouts
 * (equal shapes), so common views become 1-D or 2-D. Returns the new ndim. */
int collapse_pair(int nd, int64_t *shape, int64_t *ds, int64_t *ss)
{
    int out = 0;
    for (int k = 0; k < nd; k++) {
        if (shape[k] == 1 && nd > 1) continue; /* size-1 dims never move the offset */
        if (out > 0 && ds[out - 1] == ds[k] * shape[k] && ss[out - 1] == ss[k] * shape[k]) {
            shape[out - 1] *= shape[k];
            ds[out - 1] = ds[k];
            ss[out - 1] = ss[k];
            continue;
        }
        shape[out] = shape[k];
        ds[out] = ds[k];
        ss[out] = ss[k];
        out++;
    }
    if (out == 0) { /* every dim was 1 */
        shape[0] = 1;
        ds[0] = ss[0] = 1;
        out = 1;
    }
    return out;
}

int64_t layout_numel(const ws_layout *l)
{
    int64_t n = 1;
    for (int k = 0; k < l->ndim; k++) n *= l->shape[k];
    return n;
}

} /* namespace */

extern "C" cudaError_t ws_cuda_copy_batch(const ws_cuda_desc *descs, size_t n,
                                          uint64_t total_units, int sm_count,
                                          cudaStream_t stream)
{
    if (n == 0 || total_units == 0) return cudaSuccess;
    copy_batch_kernel<<<grid_for(total_units, sm_count, 1), kThreads, 0, stream>>>(
        descs, (int)n, total_units);
    return cudaGetLastError();
}

extern "C" cudaError_t ws_cuda_convert(void *dst, ws_dtype dt, const void *src, ws_dtype st,
                                       size_t n, int sm_count, cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    if (dt == st) {
        uint64_t bytes = (uint64_t)n * dtype_bytes(dt);
        copy_bytes_kernel<<<grid_for(bytes, sm_count, WS_CUDA_UNIT_BYTES), kThreads, 0,
                            stream>>>(dst, src, bytes);
    } else {
        convert_contig_kernel<<<grid_for(n, sm_count, kThreads * 8), kThreads, 0, stream>>>(
            dst, dt, src, st, n);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t ws_cuda_copy_strided(void *dst, ws_dtype dt, const ws_layout *dl,
                                            const void *src, ws_dtype st, const ws_layout *sl,
                                            int sm_count, cudaStream_t stream)
{
    uint64_t n = (uint64_t)layout_numel(dl);
    if (n == 0) return cudaSuccess;
    strided_args a;
    memset(&a, 0, sizeof a);
    int same_shape = dl->ndim == sl->ndim;
    for (int k = 0; same_shape && k < dl->ndim; k++) same_shape = dl->shape[k] == sl->shape[k];
    if (same_shape) {
        int nd = dl->ndim;
        for (int k = 0; k < nd; k++) {
            a.dshape[k] = a.sshape[k] = dl->shape[k];
            a.dstride[k] = dl->strides[k];
            a.sstride[k] = sl->strides[k];
        }
        if (nd == 0) {
            nd = 1;
            a.dshape[0] = a.sshape[0] = 1;
            a.dstride[0] = a.sstride[0] = 1;
        }
        nd = collapse_pair(nd, a.dshape, a.dstride, a.sstride);
        for (int k = 0; k < nd; k++) a.sshape[k] = a.dshape[k];
        a.dnd = a.snd = nd;
        if (nd == 1 && a.dstride[0] == 1 && a.sstride[0] == 1)
            return ws_cuda_convert(dst, dt, src, st, n, sm_count, stream);
        uint64_t inner = (uint64_t)a.dshape[nd - 1];
        if (nd >= 2 && inner >= 128) {
            uint64_t rows = n / inner;
            uint64_t units = rows * ((inner + kRowChunk - 1) / kRowChunk);
            rows_kernel<<<grid_for(units, sm_count, 1), kThreads, 0, stream>>>(
                dst, dt, src, st, a, rows, inner);
            return cudaGetLastError();
        }
    } else {
        a.dnd = dl->ndim;
        a.snd = sl->ndim;
        for (int k = 0; k < dl->ndim; k++) {
            a.dshape[k] = dl->shape[k];
            a.dstride[k] = dl->strides[k];
        }
        for (int k = 0; k < sl->ndim; k++) {
            a.sshape[k] = sl->shape[k];
            a.sstride[k] = sl->strides[k];
        }
    }
    strided_kernel<<<grid_for(n, sm_count, kThreads * 4), kThreads, 0, stream>>>(dst, dt, src,
                                                                                 st, a, n);
    return cudaGetLastError();
}

extern "C" cudaError_t ws_cuda_fill(void *ptr, size_t elem_size, uint64_t bits, size_t count,
                                    int sm_count, cudaStream_t stream)
{
    if (count == 0) return cudaSuccess;
    uint64_t bytes = (uint64_t)count * elem_size;
    fill_kernel<<<grid_for(bytes / 16 + 1, sm_count, kThreads * 4), kThreads, 0, stream>>>(
        (uint8_t *)ptr, (int)elem_size, bits, count);
    return cudaGetLastError();
}

extern "C" cudaError_t ws_cuda_random(void *ptr, ws_dtype t, size_t count, uint64_t seed,
                                      uint64_t first_index, float scale, int sm_count,
                                      cudaStream_t stream)
{
    if (count == 0) return cudaSuccess;
    random_kernel<<<grid_for(count, sm_count, kThreads * 4), kThreads, 0, stream>>>(
        ptr, t, count, seed, first_index, scale);
    return cudaGetLastError();
}

extern "C" cudaError_t ws_cuda_checksum_rows(const void *ptr, ws_dtype t, int64_t rows,
                                             int64_t cols, uint64_t first_index, uint64_t pitch,
                                             ws_dtype as, unsigned long long *sum, int sm_count,
                                             cudaStream_t stream)
{
    cudaError_t e = cudaMemsetAsync(sum, 0, sizeof *sum, stream);
    if (e != cudaSuccess) return e;
    uint64_t n = (uint64_t)(rows * cols);
    if (n == 0) return cudaSuccess;
    checksum_args a;
    memset(&a, 0, sizeof a);
    a.nd = 1;
    a.contiguous = 1;
    a.shape[0] = (int64_t)n;
    a.stride[0] = 1;
    a.cols = (uint64_t)cols;
    a.pitch = pitch;
    checksum_kernel<<<grid_for(n, sm_count, kThreads * 8), kThreads, 0, stream>>>(
        ptr, t, a, n, first_index, as, sum);
    return cudaGetLastError();
}

extern "C" cudaError_t ws_cuda_checksum(const void *ptr, ws_dtype t, const ws_layout *l,
                                        uint64_t first_index, ws_dtype as,
                                        unsigned long long *sum, int sm_count,
                                        cudaStream_t stream)
{
    cudaError_t e = cudaMemsetAsync(sum, 0, sizeof *sum, stream);
    if (e != cudaSuccess) return e;
    uint64_t n = (uint64_t)layout_numel(l);
    if (n == 0) return cudaSuccess;
    checksum_args a;
    memset(&a, 0, sizeof a);
    int64_t shape[WS_MAX_DIMS], stride[WS_MAX_DIMS], unused[WS_MAX_DIMS];
    int nd = l->ndim;
    for (int k = 0; k < nd; k++) {
        shape[k] = l->shape[k];
        stride[k] = unused[k] = l->strides[k];
    }
    if (nd == 0) {
        nd = 1;
        shape[0] = stride[0] = unused[0] = 1;
    }
    nd = collapse_pair(nd, shape, stride, unused);
    a.nd = nd;
    a.contiguous = nd == 1 && stride[0] == 1;
    for (int k = 0; k < nd; k++) {
        a.shape[k] = shape[k];
        a.stride[k] = stride[k];
    }
    checksum_kernel<<<grid_for(n, sm_count, kThreads * 8), kThreads, 0, stream>>>(
        ptr, t, a, n, first_index, as, sum);
    return cudaGetLastError();
}
