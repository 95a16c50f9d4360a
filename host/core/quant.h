/* quant.h: block-scaled FP8 weights (engine_dtype=fp8_block).
 *
 * ws_quantize_fp8_block is what the sync runs: many tensors in one device
 * call (quant.c on the cpu, a CUDA kernel on a GPU), with the arithmetic of
 * quant_block.h. ws_quantize_fp8_block_reference is what verification runs:
 * the same definition written a second time, plainly and apart (quant_ref.c):
 * double arithmetic, its own amax loop and its own e4m3 rounding (frexp and
 * nearbyint, not the bit manipulation of dtype_convert.h). Agreement of the
 * two, bit for bit, is what proves the engine's fp8 weights. */
#ifndef WS_QUANT_H
#define WS_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "quant_block.h"
#include "tensor.h"

/* The scales' shape of a weight of `shape` (ndim >= 2): the leading dims
 * kept, the last two divided by 128, rounded up. */
void ws_fp8_block_scale_shape(int ndim, const int64_t *shape, int64_t *out);

/* q[i] (fp8 e4m3), scales[i] (f32) <- srcs[i] (f32, bf16 or f16, ndim >= 2),
 * all contiguous and on one device; q has src's shape, scales the shape
 * above. Misuse is WS_ERR_ARG naming the item and the tensor. */
ws_status ws_quantize_fp8_block(const ws_tensor *const *srcs, ws_tensor *const *qs,
                                ws_tensor *const *scales, size_t n);

/* The checks of item i (0-based, for messages) of the call above, without
 * touching data: fills x's dtype and shape (not its pointers); *dev is the
 * device of the first item (NULL before it). */
ws_status ws_quantize_fp8_block_check(const ws_tensor *src, const ws_tensor *q,
                                      const ws_tensor *scale, size_t i, ws_device **dev,
                                      ws_quant_desc *x);

/* The verification's quantizer, for cpu tensors only (same contract). */
ws_status ws_quantize_fp8_block_reference(const ws_tensor *src, ws_tensor *q, ws_tensor *scale);

/* The dequantization error of (q, scale) against src, cpu tensors: the
 * largest, over blocks, of max |q * scale_inv - x| / amax(block), over
 * finite elements (a block with amax 0 counts 0). */
ws_status ws_fp8_block_error(const ws_tensor *src, const ws_tensor *q, const ws_tensor *scale,
                             double *max_rel);

/* The cpu backend's op (device_cpu.c's table points here). */
ws_status ws_cpu_quantize_fp8_block(ws_device *d, const ws_quant_desc *descs, size_t n);

#endif
