/* quant.c: block-scaled FP8 quantization: the tensor-level call the sync
 * runs and the cpu backend's implementation of it.
 *
 * The cpu loop works one block row (128 rows of one matrix) at a time, split
 * across the worker threads: a first pass over the rows takes each column
 * block's amax, a second quantizes. A block row of a few thousand columns
 * stays in cache between the passes, so the source is read from memory
 * once. The arithmetic is quant_block.h's, which the CUDA kernel compiles
 * too. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"
#include "parallel.h"
#include "quant.h"

/* Columns handled per pass: the row segment converted to f32 lives on the
 * stack, and so do the amax and scale of its column blocks. */
#define SEG_COLS 8192
#define SEG_BLOCKS (SEG_COLS / WS_FP8_BLOCK)

void ws_fp8_block_scale_shape(int ndim, const int64_t *shape, int64_t *out)
{
    for (int i = 0; i < ndim; i++)
        out[i] = i >= ndim - 2 ? (shape[i] + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK : shape[i];
}

/* ---- the cpu backend --------------------------------------------------------------- */

static inline void load_f32(float *dst, const void *src, ws_dtype t, size_t n)
{
    if (t == WS_F32) {
        memcpy(dst, src, n * sizeof *dst);
    } else if (t == WS_BF16) {
        const uint16_t *s = src;
        for (size_t j = 0; j < n; j++) dst[j] = ws_bf16_to_f32(s[j]);
    } else {
        const uint16_t *s = src;
        for (size_t j = 0; j < n; j++) dst[j] = ws_f16_to_f32(s[j]);
    }
}

/* Block row `br` of matrix `b` of one descriptor. Cloned for AVX-512 (its
 * per-lane shifts vectorize the e4m3 rounding) where the CPU has it. */
WS_CLONES_V4
static void quantize_block_row(const ws_quant_desc *x, int64_t b, int64_t br)
{
    float buf[SEG_COLS];
    uint32_t amax[SEG_BLOCKS];
    float sinv[SEG_BLOCKS];
    size_t es = ws_dtype_size(x->src_dtype);
    int64_t r0 = br * WS_FP8_BLOCK;
    int64_t nr = x->rows - r0 < WS_FP8_BLOCK ? x->rows - r0 : WS_FP8_BLOCK;
    int64_t bcols = (x->cols + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
    int64_t brows = (x->rows + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
    const char *src = (const char *)x->src + (size_t)((b * x->rows + r0) * x->cols) * es;
    uint8_t *q = (uint8_t *)x->q + (size_t)((b * x->rows + r0) * x->cols);
    float *scale = x->scale_inv + (size_t)((b * brows + br) * bcols);
    for (int64_t c0 = 0; c0 < x->cols; c0 += SEG_COLS) {
        int64_t nc = x->cols - c0 < SEG_COLS ? x->cols - c0 : SEG_COLS;
        int64_t nb = (nc + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
        memset(amax, 0, sizeof amax);
        for (int64_t r = 0; r < nr; r++) {
            load_f32(buf, src + (size_t)(r * x->cols + c0) * es, x->src_dtype, (size_t)nc);
            for (int64_t k = 0; k < nb; k++) {
                int64_t end = (k + 1) * WS_FP8_BLOCK < nc ? (k + 1) * WS_FP8_BLOCK : nc;
                uint32_t m = amax[k];
                for (int64_t j = k * WS_FP8_BLOCK; j < end; j++) {
                    uint32_t a = ws_fp8_abs_bits(buf[j]);
                    m = a > m ? a : m;
                }
                amax[k] = m;
            }
        }
        for (int64_t k = 0; k < nb; k++) {
            sinv[k] = ws_fp8_scale_inv(amax[k]);
            scale[c0 / WS_FP8_BLOCK + k] = sinv[k];
        }
        for (int64_t r = 0; r < nr; r++) {
            load_f32(buf, src + (size_t)(r * x->cols + c0) * es, x->src_dtype, (size_t)nc);
            uint8_t *qr = q + (size_t)(r * x->cols + c0);
            for (int64_t k = 0; k < nb; k++) {
                int64_t end = (k + 1) * WS_FP8_BLOCK < nc ? (k + 1) * WS_FP8_BLOCK : nc;
                float s = sinv[k];
                for (int64_t j = k * WS_FP8_BLOCK; j < end; j++) qr[j] = ws_fp8_quantize(buf[j], s);
            }
        }
    }
}

typedef struct {
    const ws_quant_desc *descs;
    const size_t *unit_begin; /* prefix sums of block rows over the descriptors */
} quant_ctx;

static void quantize_units(void *vctx, size_t u0, size_t u1, int worker)
{
    (void)worker;
    const quant_ctx *c = vctx;
    size_t i = 0;
    for (size_t u = u0; u < u1; u++) {
        while (u >= c->unit_begin[i + 1]) i++;
        const ws_quant_desc *x = &c->descs[i];
        int64_t brows = (x->rows + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
        int64_t local = (int64_t)(u - c->unit_begin[i]);
        quantize_block_row(x, local / brows, local % brows);
    }
}

ws_status ws_cpu_quantize_fp8_block(ws_device *d, const ws_quant_desc *descs, size_t n)
{
    (void)d;
    if (n == 0) return WS_OK;
    size_t *begin = ws_malloc((n + 1) * sizeof *begin);
    if (!begin)
        return WS_ERR(WS_ERR_NOMEM, "quantize_fp8_block: out of memory for %zu descriptors", n);
    begin[0] = 0;
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const ws_quant_desc *x = &descs[i];
        int64_t brows = x->rows && x->cols ? (x->rows + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK : 0;
        begin[i + 1] = begin[i] + (size_t)(x->batch * brows);
        bytes += (size_t)(x->batch * x->rows * x->cols) * ws_dtype_size(x->src_dtype);
    }
    quant_ctx c = {descs, begin};
    size_t units = begin[n];
    /* About a megabyte of source per chunk; one thread for small work. */
    size_t per_unit = units ? bytes / units + 1 : 1;
    ws_parallel_for(units, ((size_t)1 << 20) / per_unit + 1, quantize_units, &c);
    free(begin);
    return WS_OK;
}

/* ---- the tensor-level call ---------------------------------------------------------- */

ws_status ws_quantize_fp8_block_check(const ws_tensor *src, const ws_tensor *q,
                                      const ws_tensor *scale, size_t i, ws_device **dev,
                                      ws_quant_desc *x)
{
    char l1[200], l2[200], t1[160], t2[160];
    const char *what = "quantize_fp8_block";
    if (!src || !q || !scale)
        return WS_ERR(WS_ERR_ARG, "%s: item %zu is missing a tensor", what, i + 1);
    WS_TRY(ws_tensor_check_live(src, what));
    WS_TRY(ws_tensor_check_live(q, what));
    WS_TRY(ws_tensor_check_live(scale, what));
    if (src->dtype != WS_F32 && src->dtype != WS_BF16 && src->dtype != WS_F16)
        return WS_ERR(WS_ERR_ARG, "%s: item %zu: source %s is %s; it must be f32, bf16 or f16",
                      what, i + 1, ws_tensor_label(src, l1, sizeof l1),
                      ws_tensor_typestr(src, t1, sizeof t1));
    if (q->dtype != WS_FP8E4M3 || scale->dtype != WS_F32)
        return WS_ERR(WS_ERR_ARG, "%s: item %zu: %s (%s) must be fp8 and %s (%s) f32", what,
                      i + 1, ws_tensor_label(q, l1, sizeof l1), ws_tensor_typestr(q, t1, sizeof t1),
                      ws_tensor_label(scale, l2, sizeof l2),
                      ws_tensor_typestr(scale, t2, sizeof t2));
    int nd = src->layout.ndim;
    if (nd < 2)
        return WS_ERR(WS_ERR_ARG, "%s: item %zu: %s (%s) has fewer than 2 dimensions", what,
                      i + 1, ws_tensor_label(src, l1, sizeof l1),
                      ws_tensor_typestr(src, t1, sizeof t1));
    if (!ws_tensor_same_shape(q, src))
        return WS_ERR(WS_ERR_ARG, "%s: item %zu: %s is %s but its source %s is %s", what, i + 1,
                      ws_tensor_label(q, l1, sizeof l1), ws_tensor_typestr(q, t1, sizeof t1),
                      ws_tensor_label(src, l2, sizeof l2), ws_tensor_typestr(src, t2, sizeof t2));
    int64_t want[WS_MAX_DIMS];
    ws_fp8_block_scale_shape(nd, src->layout.shape, want);
    int same = scale->layout.ndim == nd;
    for (int k = 0; same && k < nd; k++) same = scale->layout.shape[k] == want[k];
    if (!same)
        return WS_ERR(WS_ERR_ARG, "%s: item %zu: scales %s are %s; a source %s needs one f32 per "
                      "128x128 block: [.., %lld, %lld]", what, i + 1,
                      ws_tensor_label(scale, l1, sizeof l1),
                      ws_tensor_typestr(scale, t1, sizeof t1),
                      ws_tensor_typestr(src, t2, sizeof t2),
                      (long long)want[nd - 2], (long long)want[nd - 1]);
    if (!ws_tensor_is_contiguous(src) || !ws_tensor_is_contiguous(q) ||
        !ws_tensor_is_contiguous(scale))
        return WS_ERR(WS_ERR_ARG, "%s: item %zu: %s, %s and their scales must be contiguous",
                      what, i + 1, ws_tensor_label(src, l1, sizeof l1),
                      ws_tensor_label(q, l2, sizeof l2));
    ws_device *d = ws_tensor_device(src);
    if (!*dev) *dev = d;
    if (d != *dev || ws_tensor_device(q) != d || ws_tensor_device(scale) != d)
        return WS_ERR(WS_ERR_ARG, "%s: item %zu: %s is not on %s with the other tensors", what,
                      i + 1, ws_tensor_label(src, l1, sizeof l1), (*dev)->name);
    memset(x, 0, sizeof *x);
    x->src_dtype = src->dtype;
    x->rows = src->layout.shape[nd - 2];
    x->cols = src->layout.shape[nd - 1];
    x->batch = 1;
    for (int k = 0; k < nd - 2; k++) x->batch *= src->layout.shape[k];
    return WS_OK;
}

ws_status ws_quantize_fp8_block(const ws_tensor *const *srcs, ws_tensor *const *qs,
                                ws_tensor *const *scales, size_t n)
{
    if (n == 0) return WS_OK;
    ws_quant_desc *descs = ws_malloc(n * sizeof *descs);
    if (!descs)
        return WS_ERR(WS_ERR_NOMEM, "quantize_fp8_block: out of memory for %zu descriptors", n);
    ws_device *dev = NULL;
    ws_status rc = WS_OK;
    size_t kept = 0;
    for (size_t i = 0; i < n && rc == WS_OK; i++) {
        ws_quant_desc *x = &descs[kept];
        rc = ws_quantize_fp8_block_check(srcs[i], qs[i], scales[i], i, &dev, x);
        /* Empty tensors have nothing to quantize (and may have no data). */
        if (rc != WS_OK || x->batch * x->rows * x->cols == 0) continue;
        void *sp = NULL, *qp = NULL, *cp = NULL;
        const char *what = "quantize_fp8_block";
        rc = ws_tensor_access(srcs[i], WS_ACCESS_READ, what, &sp);
        if (rc == WS_OK) rc = ws_tensor_access(qs[i], WS_ACCESS_WRITE, what, &qp);
        if (rc == WS_OK) rc = ws_tensor_access(scales[i], WS_ACCESS_WRITE, what, &cp);
        x->src = sp;
        x->q = qp;
        x->scale_inv = cp;
        if (rc == WS_OK) kept++;
    }
    if (rc == WS_OK && kept) rc = dev->ops->quantize_fp8_block(dev, descs, kept);
    free(descs);
    if (rc != WS_OK) return rc;
    for (size_t i = 0; i < n; i++) {
        ws_tensor_mark_written(qs[i]);
        ws_tensor_mark_written(scales[i]);
    }
    return WS_OK;
}
