/* dtype_convert.h: the bit-exact scalar conversions, one source for the CPU
 * and the GPU.
 *
 * Every function here is inline and also compiles as CUDA device code, so
 * ws_convert_host (dtype.c) and the kernels (cuda/cuda_kernels.cu) run the
 * same algorithms and a CPU-only build tests what the GPU computes.
 *
 * Narrowing float conversions round to nearest, ties to even, on the integer
 * bits (never through the FPU's rounding mode). NaN handling:
 *   - every NaN produced is quiet, keeps its sign and the top payload bits
 *     that fit (f32->bf16: bits>>16 | 0x0040; f32->f16: sign|0x7E00|m>>13;
 *     widening shifts the payload up and sets the quiet bit);
 *   - fp8 e4m3fn has no infinity: like PyTorch's float8_e4m3fn, +-inf, NaN
 *     and anything that rounds beyond 448 (|x| > 464, and 464 itself rounds
 *     to 448 by ties-to-even) become 0x7F with the input's sign; 0x7F/0xFF
 *     decode to sign|0x7FF00000 (the payload 111 shifted up), as PyTorch does.
 *   - f16 and bf16 overflow to +-inf.
 * Integers: float->int truncates toward zero and saturates to the target's
 * range (NaN -> 0); int->int saturates. */
#ifndef WS_DTYPE_CONVERT_H
#define WS_DTYPE_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define WS_HOST_DEVICE __host__ __device__
#else
#define WS_HOST_DEVICE
#endif

static inline WS_HOST_DEVICE uint32_t ws_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline WS_HOST_DEVICE float ws_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* v >> shift, rounded to nearest, ties to even. */
static inline WS_HOST_DEVICE uint32_t ws_shift_rne(uint32_t v, unsigned shift)
{
    if (shift == 0) return v;
    if (shift >= 32) return 0; /* callers pass v < 2^31: below half an ulp */
    uint32_t q = v >> shift;
    uint32_t rem = v & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return q;
}

/* Magnitude of finite |f| (f32 bits a) in a small float format with `mbits`
 * mantissa bits whose smallest normal has f32 biased exponent `min_exp`.
 * The result may carry into the exponent (and past the largest finite
 * value); callers handle overflow. */
static inline WS_HOST_DEVICE uint32_t ws_narrow_magnitude(uint32_t a, unsigned mbits,
                                                          uint32_t min_exp)
{
    uint32_t exp = a >> 23, mant = a & 0x7FFFFF;
    if (exp >= min_exp) {
        /* Rebias so the target exponent field starts at 1 for min_exp. */
        uint32_t v = ((exp - min_exp + 1) << 23) | mant;
        return ws_shift_rne(v, 23 - mbits);
    }
    /* Target subnormal: value = sig * 2^(exp-150); unit = 2^(min_exp-127-mbits). */
    uint32_t sig = exp ? (mant | 0x800000) : mant;
    uint32_t e = exp ? exp : 1;
    return ws_shift_rne(sig, 23 - mbits + (min_exp - e));
}

/* Branch-free, so the CPU's bulk loops over it vectorize. bf16 has f32's
 * exponent range: rounding the low half is all there is, and a carry into
 * the exponent correctly overflows to inf. */
static inline WS_HOST_DEVICE uint16_t ws_f32_to_bf16(float f)
{
    uint32_t u = ws_f32_bits(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet = (u >> 16) | 0x0040u;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);
}

static inline WS_HOST_DEVICE float ws_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    u |= (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x00400000u : 0u;
    return ws_bits_f32(u);
}

static inline WS_HOST_DEVICE uint16_t ws_f32_to_f16(float f)
{
    uint32_t u = ws_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7FFFFFFF;
    if (a > 0x7F800000) return (uint16_t)(sign | 0x7E00 | ((a & 0x7FFFFF) >> 13));
    if (a >= 0x47800000) return (uint16_t)(sign | 0x7C00); /* >= 2^16 (and inf): overflow */
    uint32_t m = ws_narrow_magnitude(a, 10, 113);         /* smallest f16 normal 2^-14 */
    if (m >= 0x7C00) return (uint16_t)(sign | 0x7C00);     /* rounded past 65504 */
    return (uint16_t)(sign | m);
}

static inline WS_HOST_DEVICE float ws_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    if (exp == 0x1F) {
        uint32_t u = sign | 0x7F800000 | (mant << 13);
        if (mant) u |= 0x00400000;
        return ws_bits_f32(u);
    }
    if (exp == 0) {
        /* Subnormal (or zero): mant * 2^-24 is an exact normal f32 (or 0),
         * so the product is exact in any rounding mode. */
        float v = (float)mant * 5.9604644775390625e-8f;
        return ws_bits_f32(ws_f32_bits(v) | sign);
    }
    return ws_bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

static inline WS_HOST_DEVICE uint8_t ws_f32_to_fp8e4m3(float f)
{
    uint32_t u = ws_f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7FFFFFFF;
    if (a >= 0x43F00000) return (uint8_t)(sign | 0x7F); /* >= 480, inf, NaN */
    uint32_t m = ws_narrow_magnitude(a, 3, 121);        /* smallest e4m3 normal 2^-6 */
    if (m > 0x7E) return (uint8_t)(sign | 0x7F);        /* (464, 480) rounds to the NaN slot */
    return (uint8_t)(sign | m);
}

/* ws_f32_to_fp8e4m3 for |f| <= 448 (not NaN), without branches or
 * comparisons (GCC's vectorizer gives up on the narrow booleans they make),
 * so bulk loops such as the FP8 block quantizer vectorize. Normal results
 * rebias the exponent and round the mantissa to 3 bits (a carry moves into
 * the exponent); subnormal ones count units of 2^-9: sig * 2^(exp-141), the
 * shift capped at 25, past which everything rounds to 0. (x - y) >> 31 is
 * x < y for values below 2^31. tests/c/test_quant.c compares it with
 * ws_f32_to_fp8e4m3 over every f32 in range. */
static inline WS_HOST_DEVICE uint8_t ws_f32_to_fp8e4m3_bounded(float f)
{
    uint32_t u = ws_f32_bits(f);
    uint32_t sign = (u >> 24) & 0x80u, a = u & 0x7FFFFFFFu;
    uint32_t normal = (a - (120u << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    uint32_t t = 141u - (a >> 23);
    uint32_t sh = t < 25u ? t : 25u;
    uint32_t sig = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t q = sig >> sh, rem = sig & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    q += ((half - rem) >> 31) | ((((rem ^ half) - 1u) >> 31) & q & 1u);
    uint32_t is_normal = 0u - ((0x3C7FFFFFu - a) >> 31); /* all ones when a >= 2^-6 */
    return (uint8_t)(sign | (normal & is_normal) | (q & ~is_normal));
}

static inline WS_HOST_DEVICE float ws_fp8e4m3_to_f32(uint8_t v)
{
    uint32_t sign = (uint32_t)(v & 0x80) << 24;
    uint32_t exp = (v >> 3) & 0xF, mant = v & 0x7;
    if (exp == 0xF && mant == 0x7) return ws_bits_f32(sign | 0x7FF00000);
    if (exp == 0) {
        float x = (float)mant * 0.001953125f; /* mant * 2^-9, exact */
        return ws_bits_f32(ws_f32_bits(x) | sign);
    }
    return ws_bits_f32(sign | ((exp + 120) << 23) | (mant << 20));
}

/* Float (through double) to an integer type of range [lo, hi]: truncated
 * toward zero, saturated, NaN -> 0. */
static inline WS_HOST_DEVICE int64_t ws_sat_from_double(double v, int64_t lo, int64_t hi)
{
    if (isnan(v)) return 0;
    v = trunc(v);
    /* Compare in double: (double)hi may round up, so test >= before casting. */
    if (v <= (double)lo) return lo;
    if (v >= (double)hi) return hi;
    return (int64_t)v;
}

/* Integer to an integer type of range [lo, hi]: saturated. */
static inline WS_HOST_DEVICE int64_t ws_sat_int(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

#endif
