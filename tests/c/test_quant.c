/* test_quant.c: block-scaled FP8 quantization (quant.h, quant_block.h).
 *
 * The production quantizer (the cpu backend's threaded loop) must equal the
 * verification's reference quantizer bit for bit on every shape, including
 * sizes that are not multiples of 128; zero blocks dequantize to exact
 * zeros; values at and beyond 448 * scale, and infinities, saturate; NaN
 * stays NaN; ties round to even; the dequantized error of a block stays
 * within half an e4m3 ulp of its largest binade (16/448 of its amax). With
 * a GPU, the CUDA kernel gives the same bits as the cpu. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "quant.h"
#include "tensor.h"

static ws_tensor make(ws_dtype dt, int nd, const int64_t *shape, ws_device *d)
{
    ws_tensor t = {0};
    ws_tensor_opts o = {.device = d};
    CHECK_OK(ws_tensor_empty(&t, dt, nd, shape, &o));
    return t;
}

/* The q and scale tensors for a source of `shape`. */
static void make_outputs(int nd, const int64_t *shape, ws_device *d, ws_tensor *q,
                         ws_tensor *s)
{
    int64_t ss[WS_MAX_DIMS];
    ws_fp8_block_scale_shape(nd, shape, ss);
    *q = make(WS_FP8E4M3, nd, shape, d);
    *s = make(WS_F32, nd, ss, d);
}

/* Random values whose magnitude varies by row and column, so blocks get
 * different scales, some of them subnormal-heavy. */
static void fill_varied(ws_tensor *t, uint64_t seed)
{
    int64_t n = ws_tensor_numel(t), cols = t->layout.shape[t->layout.ndim - 1];
    CHECK_OK(ws_tensor_random(t, seed, 1.0f, 0));
    for (int64_t i = 0; i < n; i++) {
        double v;
        CHECK_OK(ws_tensor_get(t, i, &v));
        int64_t r = i / cols, c = i % cols;
        double mag = ldexp(1.0, (int)((r / 37 + c / 53) % 24) - 12);
        CHECK_OK(ws_tensor_set(t, i, v * mag));
    }
}

static void quantize_one(ws_tensor *src, ws_tensor *q, ws_tensor *s)
{
    const ws_tensor *srcs[1] = {src};
    ws_tensor *qs[1] = {q}, *ss[1] = {s};
    CHECK_OK(ws_quantize_fp8_block(srcs, qs, ss, 1));
}

static int same_bytes(const ws_tensor *a, const ws_tensor *b)
{
    return ws_tensor_nbytes(a) == ws_tensor_nbytes(b) &&
           memcmp(ws_tensor_data(a), ws_tensor_data(b), ws_tensor_nbytes(a)) == 0;
}

/* The branch-free e4m3 rounding the quantizer uses equals the general one on
 * every f32 of magnitude up to 448 (the sign is or-ed in; one sign checked
 * in full, the other sampled). */
static void test_bounded_conversion_exhaustive(void)
{
    uint32_t bad = 0;
    for (uint32_t a = 0; a <= 0x43E00000u; a++) {
        float f;
        memcpy(&f, &a, 4);
        if (ws_f32_to_fp8e4m3_bounded(f) != ws_f32_to_fp8e4m3(f)) bad++;
    }
    for (uint32_t a = 0x80000000u; a <= 0xC3E00000u; a += 997) {
        float f;
        memcpy(&f, &a, 4);
        if (ws_f32_to_fp8e4m3_bounded(f) != ws_f32_to_fp8e4m3(f)) bad++;
    }
    CHECK_EQ_U64(bad, 0);
}

static void test_scale_shape(void)
{
    int64_t in[3] = {3, 257, 128}, out[3];
    ws_fp8_block_scale_shape(3, in, out);
    CHECK(out[0] == 3 && out[1] == 3 && out[2] == 1);
    int64_t in2[2] = {1, 129};
    ws_fp8_block_scale_shape(2, in2, out);
    CHECK(out[0] == 1 && out[1] == 2);
}

/* Production (one batched call over every shape) == reference, per shape. */
static void test_matches_reference_on_edges(void)
{
    static const int64_t shapes[][3] = {
        {1, 1, 1}, {1, 127, 129}, {1, 128, 128}, {1, 130, 300}, {3, 200, 257}, {2, 1, 513},
    };
    static const ws_dtype dts[] = {WS_BF16, WS_F32, WS_F16};
    enum { N = sizeof shapes / sizeof shapes[0] };
    for (size_t k = 0; k < sizeof dts / sizeof dts[0]; k++) {
        ws_tensor src[N], q[N], s[N], rq[N], rs[N];
        const ws_tensor *srcs[N];
        ws_tensor *qs[N], *ss[N];
        for (int i = 0; i < N; i++) {
            int nd = shapes[i][0] == 1 ? 2 : 3;
            const int64_t *sh = nd == 2 ? shapes[i] + 1 : shapes[i];
            src[i] = make(dts[k], nd, sh, NULL);
            fill_varied(&src[i], 11 + (uint64_t)i);
            make_outputs(nd, sh, NULL, &q[i], &s[i]);
            make_outputs(nd, sh, NULL, &rq[i], &rs[i]);
            srcs[i] = &src[i];
            qs[i] = &q[i];
            ss[i] = &s[i];
        }
        CHECK_OK(ws_quantize_fp8_block(srcs, qs, ss, N));
        for (int i = 0; i < N; i++) {
            CHECK_OK(ws_quantize_fp8_block_reference(&src[i], &rq[i], &rs[i]));
            if (!same_bytes(&q[i], &rq[i]) || !same_bytes(&s[i], &rs[i]))
                fprintf(stderr, "  dtype %s shape %d: production and reference differ\n",
                        ws_dtype_name(dts[k]), i);
            CHECK(same_bytes(&q[i], &rq[i]));
            CHECK(same_bytes(&s[i], &rs[i]));
            ws_tensor_free(&src[i]);
            ws_tensor_free(&q[i]);
            ws_tensor_free(&s[i]);
            ws_tensor_free(&rq[i]);
            ws_tensor_free(&rs[i]);
        }
    }
}

/* All-zero blocks: scale_inv 1, q all +0 (and -0 stays -0), dequantized exactly. */
static void test_zero_blocks(void)
{
    int64_t sh[2] = {200, 130};
    ws_tensor src = make(WS_BF16, 2, sh, NULL), q, s;
    make_outputs(2, sh, NULL, &q, &s);
    CHECK_OK(ws_tensor_fill(&src, 0.0));
    /* One non-zero tile (rows 128.., cols 0..127); a -0 in a zero tile. */
    CHECK_OK(ws_tensor_set(&src, 150 * 130 + 5, 3.0));
    CHECK_OK(ws_tensor_set(&src, 7, -0.0));
    quantize_one(&src, &q, &s);
    const uint8_t *qb = ws_tensor_data(&q);
    const float *sb = ws_tensor_data(&s);
    CHECK(sb[0] == 1.0f && sb[1] == 1.0f && sb[3] == 1.0f);
    CHECK(sb[2] == 3.0f / 448.0f);
    CHECK(qb[7] == 0x80);
    CHECK(qb[150 * 130 + 5] == 0x7E); /* 3 / (3/448) = 448 */
    int nonzero = 0;
    for (int64_t i = 0; i < 200 * 130; i++)
        if (i != 7 && i != 150 * 130 + 5 && qb[i] != 0) nonzero++;
    CHECK(nonzero == 0);
    /* The one non-zero value comes back within the f32 rounding of its scale. */
    double err;
    CHECK_OK(ws_fp8_block_error(&src, &q, &s, &err));
    CHECK(err < 1e-6);
    ws_tensor_free(&src);
    ws_tensor_free(&q);
    ws_tensor_free(&s);
}

/* Saturation, infinities, NaN, ties to even, subnormals. */
static void test_special_values(void)
{
    int64_t sh[2] = {2, 130};
    ws_tensor src = make(WS_F32, 2, sh, NULL), q, s, rq, rs;
    make_outputs(2, sh, NULL, &q, &s);
    make_outputs(2, sh, NULL, &rq, &rs);
    CHECK_OK(ws_tensor_fill(&src, 0.0));
    float *x = ws_tensor_data(&src);
    /* Block 0 (cols 0..127): amax 448 from a finite element, so scale_inv is 1
     * and the quotients are the values themselves. */
    x[0] = 448.0f;
    x[1] = 17.0f;               /* halfway between 16 and 18: to 16 (even mantissa) */
    x[2] = 19.0f;               /* halfway between 18 and 20: to 20 */
    x[3] = INFINITY;            /* left out of the amax, saturates */
    x[4] = -INFINITY;
    x[5] = NAN;
    x[6] = -NAN;
    x[7] = 0x1p-10f;            /* half the smallest subnormal 2^-9: to 0 */
    x[8] = 3 * 0x1p-10f;        /* 1.5 subnormal ulps: to 2 ulps */
    x[130] = -447.0f;
    /* Block 1 (cols 128..129): the infinities and NaN are left out, so the
     * one finite value is the amax; its own quotient rounds to 448. */
    x[128] = INFINITY;
    x[129] = NAN;
    x[130 + 128] = -INFINITY;
    x[130 + 129] = 1e30f;
    ws_tensor_mark_written(&src);
    quantize_one(&src, &q, &s);
    CHECK_OK(ws_quantize_fp8_block_reference(&src, &rq, &rs));
    CHECK(same_bytes(&q, &rq) && same_bytes(&s, &rs));
    const uint8_t *qb = ws_tensor_data(&q);
    const float *sb = ws_tensor_data(&s);
    CHECK(sb[0] == 1.0f);
    CHECK(sb[1] == 1e30f / 448.0f);
    CHECK_EQ_U64(qb[0], 0x7E);
    CHECK(ws_fp8e4m3_to_f32(qb[1]) == 16.0f);
    CHECK(ws_fp8e4m3_to_f32(qb[2]) == 20.0f);
    CHECK_EQ_U64(qb[3], 0x7E);
    CHECK_EQ_U64(qb[4], 0xFE);
    CHECK_EQ_U64(qb[5], 0x7F);
    CHECK_EQ_U64(qb[6], 0xFF);
    CHECK_EQ_U64(qb[7], 0x00);
    CHECK(ws_fp8e4m3_to_f32(qb[8]) == 0x1p-8f);
    CHECK(ws_fp8e4m3_to_f32(qb[130]) == -448.0f); /* 447 rounds to 448 (ulp 32) */
    CHECK_EQ_U64(qb[128], 0x7E);
    CHECK_EQ_U64(qb[129], 0x7F);
    CHECK_EQ_U64(qb[130 + 128], 0xFE);
    CHECK_EQ_U64(qb[130 + 129], 0x7E);
    ws_tensor_free(&src);
    ws_tensor_free(&q);
    ws_tensor_free(&s);
    ws_tensor_free(&rq);
    ws_tensor_free(&rs);
}

/* Per block, |q * scale_inv - x| <= 16/448 * amax: half the ulp (32) of
 * e4m3's top binade [256, 448], relative to 448. */
static void test_error_bound(void)
{
    int64_t sh[2] = {300, 333};
    ws_tensor src = make(WS_BF16, 2, sh, NULL), q, s;
    make_outputs(2, sh, NULL, &q, &s);
    fill_varied(&src, 5);
    quantize_one(&src, &q, &s);
    double err;
    CHECK_OK(ws_fp8_block_error(&src, &q, &s, &err));
    CHECK(err > 0.0 && err <= 16.0 / 448.0 * (1 + 1e-6));
    /* Elementwise: values in e4m3's normal range are within 1/16 of themselves. */
    const float *sb = ws_tensor_data(&s);
    const uint8_t *qb = ws_tensor_data(&q);
    for (int64_t i = 0; i < 300 * 333; i++) {
        double x, sc = sb[(i / 333 / 128) * 3 + (i % 333) / 128];
        CHECK_OK(ws_tensor_get(&src, i, &x));
        double y = (double)ws_fp8e4m3_to_f32(qb[i]) * sc;
        if (fabs(x) >= ldexp(sc, -6) && fabs(y - x) > fabs(x) / 16 * (1 + 1e-6)) {
            CHECK(!"element error above 1/16");
            break;
        }
    }
    ws_tensor_free(&src);
    ws_tensor_free(&q);
    ws_tensor_free(&s);
}

static void test_misuse(void)
{
    int64_t sh[2] = {130, 130}, bad[2] = {1, 2}, one[1] = {4};
    ws_tensor src = make(WS_BF16, 2, sh, NULL), q, s;
    make_outputs(2, sh, NULL, &q, &s);
    CHECK_OK(ws_tensor_fill(&src, 1.0));
    ws_tensor wrong = make(WS_F32, 2, bad, NULL);
    const ws_tensor *srcs[1] = {&src};
    ws_tensor *qs[1] = {&q}, *ss[1] = {&wrong};
    CHECK_ERR(ws_quantize_fp8_block(srcs, qs, ss, 1), WS_ERR_ARG, "one f32 per 128x128 block");
    ss[0] = &s;
    qs[0] = &wrong;
    CHECK_ERR(ws_quantize_fp8_block(srcs, qs, ss, 1), WS_ERR_ARG, "must be fp8");
    ws_tensor flat = make(WS_BF16, 1, one, NULL);
    srcs[0] = &flat;
    qs[0] = &q;
    CHECK_ERR(ws_quantize_fp8_block(srcs, qs, ss, 1), WS_ERR_ARG, "fewer than 2 dimensions");
    srcs[0] = &q;
    CHECK_ERR(ws_quantize_fp8_block(srcs, qs, ss, 1), WS_ERR_ARG, "must be f32, bf16 or f16");
    ws_tensor_free(&src);
    ws_tensor_free(&q);
    ws_tensor_free(&s);
    ws_tensor_free(&wrong);
    ws_tensor_free(&flat);
}

/* The CUDA kernel against the cpu backend (skipped without a GPU). */
static void test_gpu_bit_identical(void)
{
    ws_device *gpu = NULL;
    if (ws_device_cuda_count() == 0 || ws_device_get("cuda", &gpu) != WS_OK)
        SKIP(ws_device_cuda_unavailable_reason() ? ws_device_cuda_unavailable_reason()
                                                 : "no usable GPU");
    static const int64_t shapes[][3] = {{3, 200, 257}, {1, 4096, 1000}, {1, 1, 1}};
    for (int i = 0; i < 3; i++) {
        for (int k = 0; k < 2; k++) {
            ws_dtype dt = k ? WS_F32 : WS_BF16;
            ws_tensor src = make(dt, 3, shapes[i], NULL), q, s, gsrc, gq, gs, bq, bs;
            fill_varied(&src, 99 + (uint64_t)i);
            if (i == 0) { /* special values too */
                CHECK_OK(ws_tensor_set(&src, 3, INFINITY));
                CHECK_OK(ws_tensor_set(&src, 4, -NAN));
                CHECK_OK(ws_tensor_set(&src, 5, -0.0));
            }
            make_outputs(3, shapes[i], NULL, &q, &s);
            make_outputs(3, shapes[i], NULL, &bq, &bs);
            gsrc = make(dt, 3, shapes[i], gpu);
            make_outputs(3, shapes[i], gpu, &gq, &gs);
            CHECK_OK(ws_tensor_copy(&gsrc, &src));
            quantize_one(&src, &q, &s);
            quantize_one(&gsrc, &gq, &gs);
            CHECK_OK(ws_tensor_copy(&bq, &gq));
            CHECK_OK(ws_tensor_copy(&bs, &gs));
            CHECK(same_bytes(&q, &bq));
            CHECK(same_bytes(&s, &bs));
            ws_tensor *all[] = {&src, &q, &s, &gsrc, &gq, &gs, &bq, &bs};
            for (size_t j = 0; j < sizeof all / sizeof all[0]; j++) ws_tensor_free(all[j]);
        }
    }
}

int main(void)
{
    RUN(test_bounded_conversion_exhaustive);
    RUN(test_scale_shape);
    RUN(test_matches_reference_on_edges);
    RUN(test_zero_blocks);
    RUN(test_special_values);
    RUN(test_error_bound);
    RUN(test_misuse);
    RUN(test_gpu_bit_identical);
    return check_summary();
}
