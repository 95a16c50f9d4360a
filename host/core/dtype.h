/* dtype.h: element types and scalar conversions shared by every backend.
 *
 * Float conversions round to nearest, ties to even, and keep NaN (quiet),
 * infinities, signed zeros and subnormals, matching PyTorch. They live in
 * dtype_convert.h, which the CUDA kernels compile too, so CPU and GPU agree
 * bit for bit. */
#ifndef WS_DTYPE_H
#define WS_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#include "dtype_convert.h"

typedef enum ws_dtype {
    WS_F32 = 0,
    WS_BF16,
    WS_F16,
    WS_FP8E4M3, /* e4m3fn: no infinities, saturating to NaN like PyTorch's float8_e4m3fn */
    WS_U8,
    WS_I32,
    WS_I64,
    WS_DTYPE_COUNT
} ws_dtype;

size_t ws_dtype_size(ws_dtype t);
const char *ws_dtype_name(ws_dtype t); /* "f32", "bf16", ... */
/* Accepts "f32"/"float32", "bf16"/"bfloat16", "f16"/"float16"/"half",
 * "fp8"/"fp8e4m3"/"float8_e4m3fn", "u8"/"uint8", "i32"/"int32", "i64"/"int64".
 * Returns 0 on success, -1 for an unknown name. */
int ws_dtype_parse(const char *name, ws_dtype *out);
int ws_dtype_is_float(ws_dtype t);

/* Element access for small tests and scalar paths. Integers go through
 * double, so i64 beyond 2^53 loses precision in these two only. */
double ws_load_scalar(const void *p, ws_dtype t);
void ws_store_scalar(void *p, ws_dtype t, double v);

/* Converts n contiguous elements on the host (any pair of dtypes). */
void ws_convert_host(void *dst, ws_dtype dt, const void *src, ws_dtype st, size_t n);

/* Raw bits of one element, zero-extended: the value the checksum hashes. */
uint64_t ws_load_bits(const void *p, ws_dtype t);

/* A hot loop cloned for AVX-512 (WS_CLONES_V3_V4: and for AVX2) and
 * dispatched at load time (an ifunc).
 * ThreadSanitizer builds keep only the default clone: the instrumented
 * resolver would run before the sanitizer's runtime is set up, and crash. */
#if defined(__SANITIZE_THREAD__)
#define WS_CLONES_V4
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define WS_CLONES_V4
#endif
#endif
#ifndef WS_CLONES_V4
#define WS_CLONES_V4 __attribute__((target_clones("arch=x86-64-v4", "default")))
#define WS_CLONES_V3_V4 \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WS_CLONES_V3_V4
#endif

/* The inline functions below also run in CUDA kernels (cuda_kernels.cu),
 * so the CPU and the GPU compute them from the same source (WS_HOST_DEVICE
 * comes from dtype_convert.h). */

/* The per-element hash of the shard-composable checksum:
 * checksum = sum over elements of ws_hash_elem(global_index, bits) mod 2^64.
 * Any split of a tensor into shards sums to the same value, in any order.
 *
 * x = bits ^ index * WS_HASH_KEY, then a murmur-style finalizer (xor-shift,
 * multiply, xor-shift, multiply, xor-shift). Every step is a bijection of 64
 * bits, so at a given index any change to one element changes its hash:
 * one wrong element is always detected. Elements at different indices get
 * different keys, so moved or swapped values change the sum too, and the two
 * multiplies mix every input bit into every output bit (avalanche bias below
 * 0.005), so several wrong elements cancel out with probability about 2^-64.
 * It guards against corruption and wrong writes, not against an adversary.
 * Each element is hashed on its own: loops over elements have no chain but
 * the sum, and vectorize (cpu) or spread over threads (GPU). */
#define WS_HASH_KEY 0x9E3779B97F4A7C15ull

/* The finalizer after its first xor-shift. For elements of 32 bits or less,
 * (bits ^ key) >> 32 == key >> 32, so the cpu's loops fold that shift into
 * the key: ws_hash_tail(bits ^ key ^ (key >> 32)) == ws_hash_mix(bits ^ key). */
static inline WS_HOST_DEVICE uint64_t ws_hash_tail(uint64_t x)
{
    x *= 0xD6E8FEB86659FD93ull;
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ull;
    x ^= x >> 32;
    return x;
}

static inline WS_HOST_DEVICE uint64_t ws_hash_mix(uint64_t x)
{
    return ws_hash_tail(x ^ (x >> 32));
}

static inline WS_HOST_DEVICE uint64_t ws_hash_elem(uint64_t index, uint64_t bits)
{
    return ws_hash_mix(bits ^ (index * WS_HASH_KEY));
}

/* Deterministic pseudo-random value for element `index` of a stream `seed`:
 * uniform in [-scale, scale), computed in f32 with exact integer steps so the
 * CPU and the GPU produce identical bits. */
static inline WS_HOST_DEVICE float ws_random_elem(uint64_t seed, uint64_t index, float scale)
{
    uint64_t z = seed * 0xBF58476D1CE4E5B9ull + index + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(int32_t)((z >> 40) - (1u << 23)) * (1.0f / 8388608.0f); /* [-1, 1) exact */
    return u * scale;
}

#endif
