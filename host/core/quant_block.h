/* quant_block.h: the arithmetic of block-scaled FP8 weights, one source for
 * the CPU and the GPU.
 *
 * The layout is DeepSeek-V3's and Qwen3-FP8's, which vLLM loads: a weight W
 * [.., out, in] is stored as fp8 e4m3 plus `weight_scale_inv`, f32
 * [.., ceil(out/128), ceil(in/128)], one scale per 128x128 block, and
 * W ~= fp8 * scale_inv. Per block:
 *   amax      = max |x| over the block's finite elements (NaN and +-inf are
 *               left out, so one bad element cannot spoil its block's scale);
 *   scale_inv = amax / 448 in f32 (correctly rounded); when that is 0 (an
 *               all-zero block, or only f32 values below 448 * 2^-150) it is
 *               1, so zeros dequantize to exact zeros;
 *   q         = e4m3(clamp(x / scale_inv, -448, 448)): the quotient in f32
 *               (correctly rounded), clamped so nothing overflows into the
 *               NaN code, then rounded to nearest even (ws_f32_to_fp8e4m3,
 *               in its branch-free form for this range).
 *               NaN stays NaN (0x7F with the input's sign); +-inf
 *               saturates to +-448 (0x7E / 0xFE).
 * Only IEEE division and comparisons are used (no FMA, no reciprocal, no
 * fast-math), so CPU and GPU results are bit-identical. */
#ifndef WS_QUANT_BLOCK_H
#define WS_QUANT_BLOCK_H

#include <stdint.h>

#include "dtype_convert.h"

#define WS_FP8_BLOCK 128
#define WS_FP8_MAX 448.0f

/* The f32 bits of |x| for finite x, else 0. Non-negative floats order like
 * their bits, so the block's amax is an unsigned max of these. */
static inline WS_HOST_DEVICE uint32_t ws_fp8_abs_bits(float x)
{
    uint32_t a = ws_f32_bits(x) & 0x7FFFFFFFu;
    return a & (0u - ((a - 0x7F800000u) >> 31)); /* a when a < 0x7F800000; no branch */
}

static inline WS_HOST_DEVICE float ws_fp8_scale_inv(uint32_t amax_bits)
{
    float s = ws_bits_f32(amax_bits) / WS_FP8_MAX;
    return s > 0.0f ? s : 1.0f;
}

/* NaN is answered before any arithmetic: a GPU returns its canonical NaN
 * from x / s, whatever x's sign, where a CPU keeps x's. */
static inline WS_HOST_DEVICE uint8_t ws_fp8_quantize(float x, float scale_inv)
{
    uint32_t u = ws_f32_bits(x);
    float v = x / scale_inv;
    v = v > WS_FP8_MAX ? WS_FP8_MAX : v < -WS_FP8_MAX ? -WS_FP8_MAX : v;
    uint32_t nan = ((u >> 24) & 0x80u) | 0x7Fu;
    uint32_t is_nan = 0u - ((0x7F800000u - (u & 0x7FFFFFFFu)) >> 31); /* all ones for NaN */
    return (uint8_t)((nan & is_nan) | (ws_f32_to_fp8e4m3_bounded(v) & ~is_nan));
}

#endif
