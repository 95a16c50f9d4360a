/* quant_ref.c: the verification's own FP8 block quantizer and the error
 * measure of a quantization.
 *
 * The definition is quant_block.h's; the code shares none of it on purpose:
 * elements are read and scaled in double (double rounding is harmless for a
 * single division rounded to f32, since 53 >= 2 * 24 + 2), the amax is a
 * plain fabs loop, and e4m3 rounding is the textbook one (the nearest
 * multiple of the binade's step, ties to even, in double arithmetic)
 * instead of dtype_convert.h's integer shifts and carries. One tile at a time, scalar;
 * tiles are spread over the worker threads only to keep a large model's
 * verification within seconds. */
#include <math.h>
#include <string.h>

#include "parallel.h"
#include "quant.h"

static double ref_load(const void *p, ws_dtype t, size_t i)
{
    if (t == WS_F32) {
        float f;
        memcpy(&f, (const char *)p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const char *)p + 2 * i, 2);
    if (t == WS_F16) return ws_f16_to_f32(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* e4m3fn of vf, |vf| <= 448, not NaN, the textbook way: in the binade
 * [2^e, 2^(e+1)) (e >= -6; below 2^-6 the subnormals share e = -6's step)
 * the codes are 2^(e-3) apart, so the value is the nearest multiple of that
 * step (ties to the even multiple: an even mantissa), and the code counts
 * steps from the binade's start. Done in double, where every step here is
 * exact; only the binade's exponent is read from vf's bits. */
static uint8_t ref_e4m3(float vf)
{
    static const double per_step[] = { /* 1 / the step of binades -6 .. 8 */
        0x1p9, 0x1p8, 0x1p7, 0x1p6, 0x1p5, 0x1p4, 0x1p3, 0x1p2,
        0x1p1, 0x1p0, 0x1p-1, 0x1p-2, 0x1p-3, 0x1p-4, 0x1p-5,
    };
    double a = fabs((double)vf);
    uint32_t bits;
    memcpy(&bits, &vf, 4);
    int e = (int)((bits >> 23) & 0xFF) - 127;
    if (e < -6) e = -6;
    double x = a * per_step[e + 6]; /* in [0, 16]: exact (a power-of-two scaling) */
    int64_t fl = (int64_t)x;        /* floor, x >= 0 */
    double frac = x - (double)fl;
    /* Without short-circuits: the rounding direction of random data is a
     * coin toss, which a branch would mispredict half the time. */
    int64_t r = fl + ((frac > 0.5) | ((frac == 0.5) & (int)(fl & 1)));
    int code = ((e + 7) << 3) + (int)r - 8; /* r = 16 carries into the next binade */
    return (uint8_t)((signbit(vf) ? 0x80 : 0) | code);
}

typedef struct {
    const void *src;
    ws_dtype st;
    uint8_t *q;
    float *scale;
    const uint8_t *q_in;       /* error measure: the quantization to judge */
    const float *scale_in;
    int64_t rows, cols, brows, bcols;
    double *worst;             /* error measure: per worker */
} ref_ctx;

static void tile_bounds(const ref_ctx *c, size_t tile, int64_t *b, int64_t *r0, int64_t *r1,
                        int64_t *c0, int64_t *c1)
{
    int64_t per = c->brows * c->bcols, t = (int64_t)tile;
    *b = t / per;
    int64_t br = t % per / c->bcols, bc = t % c->bcols;
    *r0 = br * WS_FP8_BLOCK;
    *r1 = *r0 + WS_FP8_BLOCK < c->rows ? *r0 + WS_FP8_BLOCK : c->rows;
    *c0 = bc * WS_FP8_BLOCK;
    *c1 = *c0 + WS_FP8_BLOCK < c->cols ? *c0 + WS_FP8_BLOCK : c->cols;
}

static double tile_amax(const ref_ctx *c, int64_t b, int64_t r0, int64_t r1, int64_t c0,
                        int64_t c1)
{
    double amax = 0;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t k = c0; k < c1; k++) {
            double x = ref_load(c->src, c->st, (size_t)((b * c->rows + r) * c->cols + k));
            if (isfinite(x) && fabs(x) > amax) amax = fabs(x);
        }
    return amax;
}

static void ref_tiles(void *vctx, size_t t0, size_t t1, int worker)
{
    (void)worker;
    const ref_ctx *c = vctx;
    for (size_t t = t0; t < t1; t++) {
        int64_t b, r0, r1, c0, c1;
        tile_bounds(c, t, &b, &r0, &r1, &c0, &c1);
        float s = (float)(tile_amax(c, b, r0, r1, c0, c1) / 448.0);
        if (s == 0.0f) s = 1.0f;
        c->scale[t] = s;
        for (int64_t r = r0; r < r1; r++)
            for (int64_t k = c0; k < c1; k++) {
                size_t i = (size_t)((b * c->rows + r) * c->cols + k);
                double x = ref_load(c->src, c->st, i);
                if (isnan(x)) {
                    c->q[i] = signbit(x) ? 0xFF : 0x7F;
                    continue;
                }
                double v = x / s;
                if (v > 448.0) v = 448.0;
                if (v < -448.0) v = -448.0;
                c->q[i] = ref_e4m3((float)v);
            }
    }
}

static void err_tiles(void *vctx, size_t t0, size_t t1, int worker)
{
    const ref_ctx *c = vctx;
    double worst = c->worst[worker];
    for (size_t t = t0; t < t1; t++) {
        int64_t b, r0, r1, c0, c1;
        tile_bounds(c, t, &b, &r0, &r1, &c0, &c1);
        double amax = tile_amax(c, b, r0, r1, c0, c1), err = 0, s = c->scale_in[t];
        for (int64_t r = r0; r < r1; r++)
            for (int64_t k = c0; k < c1; k++) {
                size_t i = (size_t)((b * c->rows + r) * c->cols + k);
                double x = ref_load(c->src, c->st, i);
                double y = (double)ws_fp8e4m3_to_f32(c->q_in[i]) * s;
                if (isfinite(x) && fabs(y - x) > err) err = fabs(y - x);
            }
        if (amax > 0 && err / amax > worst) worst = err / amax;
    }
    c->worst[worker] = worst;
}

/* Checks the three cpu tensors and fills the shape part of the context. */
/* Checks the three tensors, fills c (shape, and the data pointers: q and
 * scale as outputs when write, else as the quantization to judge) and
 * returns the number of 128x128 tiles in *tiles (0: nothing to do). */
static ws_status host_args(const ws_tensor *src, const ws_tensor *q, const ws_tensor *scale,
                           const char *what, int write, ref_ctx *c, size_t *tiles)
{
    *tiles = 0;
    char l1[200];
    const ws_tensor *all[3] = {src, q, scale};
    for (int k = 0; k < 3; k++) {
        WS_TRY(ws_tensor_check_live(all[k], what));
        if (ws_tensor_device(all[k])->kind != WS_DEVICE_CPU)
            return WS_ERR(WS_ERR_ARG, "%s: %s is on %s; this check runs on cpu tensors (copy "
                          "it with :to(\"cpu\"))", what, ws_tensor_label(all[k], l1, sizeof l1),
                          ws_tensor_device(all[k])->name);
    }
    /* The production call's own checks of dtypes, shapes and contiguity. */
    ws_quant_desc x;
    ws_device *dev = NULL;
    WS_TRY(ws_quantize_fp8_block_check(src, q, scale, 0, &dev, &x));
    memset(c, 0, sizeof *c);
    c->st = src->dtype;
    c->rows = x.rows;
    c->cols = x.cols;
    c->brows = (x.rows + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
    c->bcols = (x.cols + WS_FP8_BLOCK - 1) / WS_FP8_BLOCK;
    if (ws_tensor_numel(src) == 0) return WS_OK;
    int access = write ? WS_ACCESS_WRITE : WS_ACCESS_READ;
    void *sp, *qp, *cp;
    WS_TRY(ws_tensor_access(src, WS_ACCESS_READ, what, &sp));
    WS_TRY(ws_tensor_access(q, access, what, &qp));
    WS_TRY(ws_tensor_access(scale, access, what, &cp));
    c->src = sp;
    if (write) {
        c->q = qp;
        c->scale = cp;
    } else {
        c->q_in = qp;
        c->scale_in = cp;
    }
    int64_t batch = ws_tensor_numel(src) / (c->rows * c->cols);
    *tiles = (size_t)(batch * c->brows * c->bcols);
    return WS_OK;
}

ws_status ws_quantize_fp8_block_reference(const ws_tensor *src, ws_tensor *q, ws_tensor *scale)
{
    ref_ctx c;
    size_t tiles;
    WS_TRY(host_args(src, q, scale, "quantize_fp8_block_reference", 1, &c, &tiles));
    if (tiles == 0) return WS_OK;
    ws_parallel_for(tiles, 4, ref_tiles, &c);
    ws_tensor_mark_written(q);
    ws_tensor_mark_written(scale);
    return WS_OK;
}

ws_status ws_fp8_block_error(const ws_tensor *src, const ws_tensor *q, const ws_tensor *scale,
                             double *max_rel)
{
    ref_ctx c;
    size_t tiles;
    *max_rel = 0;
    WS_TRY(host_args(src, q, scale, "fp8_block_error", 0, &c, &tiles));
    if (tiles == 0) return WS_OK;
    double worst[256] = {0};
    c.worst = worst;
    ws_parallel_for(tiles, 4, err_tiles, &c);
    for (int k = 0; k < 256; k++) *max_rel = worst[k] > *max_rel ? worst[k] : *max_rel;
    return WS_OK;
}
