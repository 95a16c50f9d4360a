/* test_dtype.c: bit-exact float conversions, names, scalar access, bulk
 * conversion. Expected bits are derived by hand (see the comment on each
 * row) or by brute force over every code of the narrow format. The scalar
 * conversions come from dtype_convert.h, which the CUDA kernels compile too:
 * these tests are the CPU-only check of what the GPU computes. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "dtype.h"
#include "status.h"

static float f32_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

typedef struct {
    uint32_t in;
    uint32_t out;
} pair;

static void test_names_and_sizes(void)
{
    static const struct {
        const char *name;
        ws_dtype t;
        size_t size;
    } rows[] = {
        {"f32", WS_F32, 4},   {"float32", WS_F32, 4},        {"bf16", WS_BF16, 2},
        {"bfloat16", WS_BF16, 2}, {"f16", WS_F16, 2},        {"half", WS_F16, 2},
        {"float16", WS_F16, 2}, {"fp8", WS_FP8E4M3, 1},      {"float8_e4m3fn", WS_FP8E4M3, 1},
        {"fp8e4m3", WS_FP8E4M3, 1}, {"u8", WS_U8, 1},        {"uint8", WS_U8, 1},
        {"i32", WS_I32, 4},   {"int32", WS_I32, 4},          {"i64", WS_I64, 8},
        {"int64", WS_I64, 8},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        ws_dtype t = WS_DTYPE_COUNT;
        CHECK(ws_dtype_parse(rows[i].name, &t) == 0);
        CHECK(t == rows[i].t);
        CHECK(ws_dtype_size(t) == rows[i].size);
    }
    ws_dtype t = WS_F32;
    CHECK(ws_dtype_parse("f8", &t) == -1);
    CHECK(ws_dtype_parse("", &t) == -1);
    CHECK(strcmp(ws_dtype_name(WS_BF16), "bf16") == 0);
    CHECK(strcmp(ws_dtype_name(WS_FP8E4M3), "fp8") == 0);
    CHECK(ws_dtype_is_float(WS_F16) && !ws_dtype_is_float(WS_I32));
}

static void test_bf16_table(void)
{
    static const pair rows[] = {
        {0x3F800000, 0x3F80}, /* 1.0 */
        {0x00000000, 0x0000}, {0x80000000, 0x8000}, /* +-0 */
        {0x7F800000, 0x7F80}, {0xFF800000, 0xFF80}, /* +-inf */
        {0x7FC00000, 0x7FC0}, {0xFFC00000, 0xFFC0}, /* quiet NaN keeps sign */
        {0x7F800001, 0x7FC0}, /* signalling NaN, payload only in the low half: quieted */
        {0xFFA00000, 0xFFE0}, /* signalling NaN: top payload kept, quiet bit set */
        {0x3F808000, 0x3F80}, /* tie, down to even */
        {0x3F818000, 0x3F82}, /* tie, up to even */
        {0x3F808001, 0x3F81}, /* just above half */
        {0x3F807FFF, 0x3F80}, /* just below half */
        {0x7F7FFFFF, 0x7F80}, /* FLT_MAX rounds up: overflow to inf */
        {0x7F7F8000, 0x7F80}, /* tie from odd 0x7F7F: up, overflow */
        {0x7F7F7FFF, 0x7F7F}, /* largest value below the overflow tie */
        {0x00010000, 0x0001}, /* smallest bf16 subnormal */
        {0x00008000, 0x0000}, /* subnormal tie to even zero */
        {0x00018000, 0x0002}, /* subnormal tie up to even */
        {0x80008001, 0x8001}, /* negative subnormal above half */
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        CHECK_EQ_U64(ws_f32_to_bf16(f32_of(rows[i].in)), rows[i].out);
    static const pair back[] = {
        {0x3F80, 0x3F800000}, {0x0001, 0x00010000}, {0x8000, 0x80000000},
        {0xFF80, 0xFF800000}, {0x7FC0, 0x7FC00000}, {0x7F81, 0x7FC10000}, /* sNaN quieted */
        {0xC049, 0xC0490000},
    };
    for (size_t i = 0; i < sizeof back / sizeof back[0]; i++)
        CHECK_EQ_U64(bits_of(ws_bf16_to_f32((uint16_t)back[i].in)), back[i].out);
}

static void test_f16_table(void)
{
    static const pair rows[] = {
        {0x3F800000, 0x3C00}, /* 1.0 */
        {0xC0000000, 0xC000}, /* -2.0 */
        {0x00000000, 0x0000}, {0x80000000, 0x8000},
        {0x477FE000, 0x7BFF}, /* 65504, the largest finite */
        {0x477FEFFF, 0x7BFF}, /* below the overflow tie */
        {0x477FF000, 0x7C00}, /* 65520: tie from odd 0x7BFF, overflows to inf */
        {0x47800000, 0x7C00}, /* 65536 */
        {0x7F800000, 0x7C00}, {0xFF800000, 0xFC00},
        {0x7FC00000, 0x7E00}, {0xFFC00000, 0xFE00},
        {0x7F802000, 0x7E01}, /* sNaN: payload bit 13 kept, quieted */
        {0x33800000, 0x0001}, /* 2^-24, smallest subnormal */
        {0x33000000, 0x0000}, /* 2^-25: tie to even zero */
        {0xB3000000, 0x8000}, /* -2^-25: signed zero */
        {0x33400000, 0x0001}, /* 1.5 * 2^-25: above half */
        {0x33C00000, 0x0002}, /* 1.5 * 2^-24: tie up to even */
        {0x387FC000, 0x03FF}, /* largest subnormal */
        {0x387FE000, 0x0400}, /* tie from odd 0x03FF into the smallest normal */
        {0x38800000, 0x0400}, /* 2^-14 */
        {0x3F801000, 0x3C00}, /* 1 + 2^-11: tie down to even */
        {0x3F803000, 0x3C02}, /* 1 + 3 * 2^-11: tie up to even */
        {0x00000001, 0x0000}, {0x80000001, 0x8000}, /* f32 subnormals underflow */
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        CHECK_EQ_U64(ws_f32_to_f16(f32_of(rows[i].in)), rows[i].out);
    static const pair back[] = {
        {0x0001, 0x33800000}, {0x03FF, 0x387FC000}, {0x8001, 0xB3800000},
        {0x7C00, 0x7F800000}, {0xFC00, 0xFF800000}, {0x7E00, 0x7FC00000},
        {0x7D00, 0x7FE00000}, /* sNaN quieted, payload shifted up */
        {0x7BFF, 0x477FE000}, {0x3555, 0x3EAAA000}, {0x8000, 0x80000000},
    };
    for (size_t i = 0; i < sizeof back / sizeof back[0]; i++)
        CHECK_EQ_U64(bits_of(ws_f16_to_f32((uint16_t)back[i].in)), back[i].out);
}

static void test_fp8_table(void)
{
    static const pair rows[] = {
        {0x3F800000, 0x38}, /* 1.0 */
        {0x00000000, 0x00}, {0x80000000, 0x80},
        {0x43E00000, 0x7E}, {0xC3E00000, 0xFE}, /* +-448, the largest finite */
        {0x43E80000, 0x7E}, /* 464: tie to even 448 (PyTorch agrees) */
        {0x43E80001, 0x7F}, /* above 464: rounds to the NaN code */
        {0x43F00000, 0x7F}, /* 480 */
        {0x49742400, 0x7F}, /* 1e6 */
        {0x7F800000, 0x7F}, {0xFF800000, 0xFF}, /* no infinity: NaN with the sign */
        {0x7FC00000, 0x7F}, {0xFFC00000, 0xFF},
        {0x3B000000, 0x01}, /* 2^-9, smallest subnormal */
        {0x3A800000, 0x00}, /* 2^-10: tie to zero */
        {0xBA800000, 0x80},
        {0x3AC00000, 0x01}, /* 1.5 * 2^-10 */
        {0x3B400000, 0x02}, /* 1.5 * 2^-9: tie up to even */
        {0x3C700000, 0x08}, /* 7.5 * 2^-9: tie from odd 0x07 into the smallest normal */
        {0x3C800000, 0x08}, /* 2^-6 */
        {0x3F880000, 0x38}, /* 1 + 1/16: tie down */
        {0x3F980000, 0x3A}, /* 1 + 3/16: tie up */
        {0x3DCCCCCD, 0x1D}, /* 0.1 -> 0.1015625 */
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        CHECK_EQ_U64(ws_f32_to_fp8e4m3(f32_of(rows[i].in)), rows[i].out);
    static const pair back[] = {
        {0x7F, 0x7FF00000}, {0xFF, 0xFFF00000}, /* PyTorch's NaN bits */
        {0x01, 0x3B000000}, {0x81, 0xBB000000}, {0x7E, 0x43E00000},
        {0x08, 0x3C800000}, {0x00, 0x00000000}, {0x80, 0x80000000},
        {0x1D, 0x3DD00000}, {0x07, 0x3C600000},
    };
    for (size_t i = 0; i < sizeof back / sizeof back[0]; i++)
        CHECK_EQ_U64(bits_of(ws_fp8e4m3_to_f32((uint8_t)back[i].in)), back[i].out);
}

/* Every code of each narrow format survives a round trip through f32. */
static void test_round_trips_exhaustive(void)
{
    int bad_bf16 = 0, bad_f16 = 0, bad_fp8 = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t b = ws_f32_to_bf16(ws_bf16_to_f32((uint16_t)h));
        int nan = (h & 0x7FFF) > 0x7F80;
        if (nan ? b != (h | 0x40) : b != h) bad_bf16++;
        uint16_t f = ws_f32_to_f16(ws_f16_to_f32((uint16_t)h));
        nan = (h & 0x7FFF) > 0x7C00;
        if (nan ? f != (h | 0x200) : f != h) bad_f16++;
    }
    for (uint32_t v = 0; v < 256; v++)
        if (ws_f32_to_fp8e4m3(ws_fp8e4m3_to_f32((uint8_t)v)) != v) bad_fp8++;
    CHECK(bad_bf16 == 0);
    CHECK(bad_f16 == 0);
    CHECK(bad_fp8 == 0);
}

/* Value of a finite narrow float code from its fields, in double (exact):
 * an independent decoding to check the conversions against. */
static double decode_fields(uint32_t code, int ebits, int mbits, int bias)
{
    uint32_t exp = (code >> mbits) & ((1u << ebits) - 1), mant = code & ((1u << mbits) - 1);
    double v = exp ? ldexp((double)((1u << mbits) | mant), (int)exp - bias - mbits)
                   : ldexp((double)mant, 1 - bias - mbits);
    return (code >> (ebits + mbits)) & 1 ? -v : v;
}

/* Widening, every code: finite values against the field decoding, NaN
 * quiet with the payload shifted up, infinities kept. */
static void test_widening_every_code(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t b = bits_of(ws_bf16_to_f32((uint16_t)h));
        uint32_t want = h << 16;
        if ((h & 0x7FFF) > 0x7F80) want |= 0x00400000;
        if (b != want) bad++;
        float f = ws_f16_to_f32((uint16_t)h);
        if ((h & 0x7C00) != 0x7C00) {
            if ((double)f != decode_fields(h, 5, 10, 15) || !!signbit(f) != !!(h & 0x8000)) bad++;
        } else {
            want = (h & 0x8000) << 16 | 0x7F800000 | (h & 0x3FF) << 13;
            if (h & 0x3FF) want |= 0x00400000;
            if (bits_of(f) != want) bad++;
        }
    }
    for (uint32_t v = 0; v < 256; v++) {
        float f = ws_fp8e4m3_to_f32((uint8_t)v);
        if ((v & 0x7F) == 0x7F) {
            if (bits_of(f) != ((v & 0x80) << 24 | 0x7FF00000)) bad++;
        } else if ((double)f != decode_fields(v, 4, 3, 7) || !!signbit(f) != !!(v & 0x80)) {
            bad++;
        }
    }
    CHECK(bad == 0);
}

/* Narrowing around every code: the code's own value, the midpoint to the
 * next code (a tie: to the even one) and the f32 values either side of the
 * midpoint, both signs. Midpoints of 16-bit and 8-bit floats are exact in
 * f32. `top` is the largest finite code; above it, `over` is what the tie
 * and the values beyond it give (inf for f16/bf16, the NaN code for fp8). */
typedef uint32_t (*narrow_fn)(float);
typedef float (*widen_fn)(uint32_t);

static uint32_t narrow_bf16(float f) { return ws_f32_to_bf16(f); }
static uint32_t narrow_f16(float f) { return ws_f32_to_f16(f); }
static uint32_t narrow_fp8(float f) { return ws_f32_to_fp8e4m3(f); }
static float widen_bf16(uint32_t c) { return ws_bf16_to_f32((uint16_t)c); }
static float widen_f16(uint32_t c) { return ws_f16_to_f32((uint16_t)c); }
static float widen_fp8(uint32_t c) { return ws_fp8e4m3_to_f32((uint8_t)c); }

static int check_narrowing(narrow_fn narrow, widen_fn widen, uint32_t top, uint32_t over,
                           uint32_t sign_bit, double beyond)
{
    int bad = 0;
    for (uint32_t c = 0; c <= top; c++) {
        for (int neg = 0; neg < 2; neg++) {
            uint32_t s = neg ? sign_bit : 0;
            float v = widen(c);
            double next = c < top ? (double)widen(c + 1) : beyond;
            float mid = (float)(((double)v + next) / 2); /* exact */
            uint32_t up = c < top ? c + 1 : over, even = (c & 1) ? up : c;
            float below = nextafterf(mid, 0.0f), above = nextafterf(mid, INFINITY);
            if (neg) {
                v = -v;
                mid = -mid;
                below = -below;
                above = -above;
            }
            if (narrow(v) != (c | s)) bad++;
            if (narrow(mid) != (even | s)) bad++;
            if (narrow(below) != (c | s)) bad++;
            if (narrow(above) != (up | s)) bad++;
        }
    }
    return bad;
}

static void test_narrowing_every_code(void)
{
    /* bf16: past the largest finite value the next "code" is inf at 2^128. */
    CHECK(check_narrowing(narrow_bf16, widen_bf16, 0x7F7F, 0x7F80, 0x8000, ldexp(1.0, 128)) == 0);
    CHECK(check_narrowing(narrow_f16, widen_f16, 0x7BFF, 0x7C00, 0x8000, 65536.0) == 0);
    /* fp8: 448 is the largest; the tie at 464 goes to even 448 (0x7E). */
    CHECK(check_narrowing(narrow_fp8, widen_fp8, 0x7E, 0x7F, 0x80, 480.0) == 0);
}

/* The specials of every narrowing: infinities, NaNs (payload and sign),
 * f32 subnormals and values far out of range. */
static void test_narrowing_specials(void)
{
    float inf = f32_of(0x7F800000), ninf = f32_of(0xFF800000);
    CHECK_EQ_U64(ws_f32_to_bf16(inf), 0x7F80);
    CHECK_EQ_U64(ws_f32_to_bf16(ninf), 0xFF80);
    CHECK_EQ_U64(ws_f32_to_f16(inf), 0x7C00);
    CHECK_EQ_U64(ws_f32_to_f16(ninf), 0xFC00);
    CHECK_EQ_U64(ws_f32_to_fp8e4m3(inf), 0x7F);
    CHECK_EQ_U64(ws_f32_to_fp8e4m3(ninf), 0xFF);
    CHECK_EQ_U64(ws_f32_to_fp8e4m3(f32_of(0x7F7FFFFF)), 0x7F); /* FLT_MAX saturates to NaN */
    CHECK_EQ_U64(ws_f32_to_f16(f32_of(0xFF7FFFFF)), 0xFC00);   /* -FLT_MAX overflows */
    int bad = 0;
    /* Every f32 NaN payload pattern of the top 16 bits, both signs. */
    for (uint32_t hi = 0; hi < 0x80; hi++) {
        for (uint32_t neg = 0; neg < 2; neg++) {
            uint32_t u = neg << 31 | 0x7F800000 | hi << 16 | 0x1; /* a NaN even when hi == 0 */
            float f = f32_of(u);
            if (ws_f32_to_bf16(f) != (((u >> 16) | 0x40) & 0xFFFF)) bad++;
            if (ws_f32_to_f16(f) != (neg << 15 | 0x7E00 | ((u & 0x7FFFFF) >> 13))) bad++;
            if (ws_f32_to_fp8e4m3(f) != (neg << 7 | 0x7F)) bad++;
        }
    }
    /* f32 subnormals: below every narrow format's smallest subnormal but
     * bf16's, whose subnormals are f32's top 16 bits. */
    for (uint32_t m = 1; m < 0x800000; m += 997) {
        for (uint32_t neg = 0; neg < 2; neg++) {
            float f = f32_of(neg << 31 | m);
            if (ws_f32_to_f16(f) != neg << 15) bad++;
            if (ws_f32_to_fp8e4m3(f) != neg << 7) bad++;
            uint32_t q = m >> 16, r = m & 0xFFFF;
            if (r > 0x8000 || (r == 0x8000 && (q & 1))) q++;
            if (ws_f32_to_bf16(f) != (neg << 15 | q)) bad++;
        }
    }
    CHECK(bad == 0);
}

/* Float to integer: truncation toward zero, saturation, NaN to zero; the
 * edges where double cannot hold the integer limit exactly. */
static void test_integer_saturation(void)
{
    CHECK(ws_sat_from_double(NAN, INT32_MIN, INT32_MAX) == 0);
    CHECK(ws_sat_from_double(INFINITY, INT32_MIN, INT32_MAX) == INT32_MAX);
    CHECK(ws_sat_from_double(-INFINITY, 0, 255) == 0);
    CHECK(ws_sat_from_double(-0.99, 0, 255) == 0);
    CHECK(ws_sat_from_double(255.99, 0, 255) == 255);
    CHECK(ws_sat_from_double(-2147483648.9, INT32_MIN, INT32_MAX) == INT32_MIN);
    CHECK(ws_sat_from_double(2147483646.9, INT32_MIN, INT32_MAX) == 2147483646);
    /* (double)INT64_MAX is 2^63: the comparison saturates before any cast. */
    CHECK(ws_sat_from_double(ldexp(1.0, 63), INT64_MIN, INT64_MAX) == INT64_MAX);
    CHECK(ws_sat_from_double(-ldexp(1.0, 63), INT64_MIN, INT64_MAX) == INT64_MIN);
    CHECK(ws_sat_from_double(ldexp(1.0, 62) + 2048.0, INT64_MIN, INT64_MAX) ==
          ((int64_t)1 << 62) + 2048);
    CHECK(ws_sat_int(INT64_MIN, 0, 255) == 0);
    CHECK(ws_sat_int(256, 0, 255) == 255);
    CHECK(ws_sat_int((int64_t)INT32_MAX + 1, INT32_MIN, INT32_MAX) == INT32_MAX);
    CHECK(ws_sat_int(-7, INT32_MIN, INT32_MAX) == -7);
}

/* An independent reference: the nearest of all finite fp8 codes, ties to the
 * even code, NaN beyond the midpoint above the largest finite value. */
static uint8_t fp8_reference(float x)
{
    if (isnan(x) || isinf(x)) return signbit(x) ? 0xFF : 0x7F;
    double a = fabs((double)x);
    uint8_t sign = signbit(x) ? 0x80 : 0;
    if (a > 464.0) return sign | 0x7F;
    int best = 0;
    double best_d = INFINITY;
    for (int c = 0; c <= 0x7E; c++) {
        double v = ws_fp8e4m3_to_f32((uint8_t)c);
        double d = fabs(v - a);
        if (d < best_d || (d == best_d && (c & 1) == 0)) {
            best = c;
            best_d = d;
        }
    }
    return (uint8_t)(sign | best);
}

static void test_fp8_matches_brute_force(void)
{
    srand(7);
    int bad = 0;
    for (int i = 0; i < 200000; i++) {
        /* Sample exponents across the whole fp8 range and beyond. */
        uint32_t mant = ((uint32_t)rand() << 8 ^ (uint32_t)rand()) & 0x7FFFFF;
        uint32_t exp = 100 + (uint32_t)(rand() % 40);
        uint32_t sign = (rand() & 1) ? 0x80000000u : 0;
        if (i % 16 == 0) mant &= 0x7C0000; /* hit exact ties often */
        float x = f32_of(sign | exp << 23 | mant);
        if (ws_f32_to_fp8e4m3(x) != fp8_reference(x)) bad++;
    }
    CHECK(bad == 0);
}

/* The same for f16, against a search over all finite positive codes. */
static uint16_t f16_reference(float x)
{
    double a = fabs((double)x);
    uint16_t sign = signbit(x) ? 0x8000 : 0;
    if (a >= 65520.0) return sign | 0x7C00;
    int lo = 0, hi = 0x7BFF; /* codes are monotonic in value */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if ((double)ws_f16_to_f32((uint16_t)mid) <= a) lo = mid;
        else hi = mid - 1;
    }
    int best = lo;
    if (lo < 0x7BFF) {
        double d0 = a - ws_f16_to_f32((uint16_t)lo), d1 = ws_f16_to_f32((uint16_t)(lo + 1)) - a;
        if (d1 < d0 || (d1 == d0 && (lo & 1))) best = lo + 1;
    }
    return (uint16_t)(sign | best);
}

static void test_f16_matches_brute_force(void)
{
    srand(11);
    int bad = 0;
    for (int i = 0; i < 200000; i++) {
        uint32_t mant = ((uint32_t)rand() << 8 ^ (uint32_t)rand()) & 0x7FFFFF;
        uint32_t exp = 95 + (uint32_t)(rand() % 50);
        uint32_t sign = (rand() & 1) ? 0x80000000u : 0;
        if (i % 16 == 0) mant &= 0x7FF000;
        float x = f32_of(sign | exp << 23 | mant);
        if (ws_f32_to_f16(x) != f16_reference(x)) bad++;
    }
    CHECK(bad == 0);
}

static void test_convert_host_floats(void)
{
    enum { N = 1000 };
    float src[N];
    uint16_t bf[N], h[N], h2[N];
    uint8_t q[N];
    srand(3);
    for (int i = 0; i < N; i++)
        src[i] = f32_of(((uint32_t)rand() << 16 ^ (uint32_t)rand()) & 0xBFFFFFFF);
    ws_convert_host(bf, WS_BF16, src, WS_F32, N);
    ws_convert_host(h, WS_F16, src, WS_F32, N);
    ws_convert_host(q, WS_FP8E4M3, src, WS_F32, N);
    int bad = 0;
    for (int i = 0; i < N; i++) {
        if (bf[i] != ws_f32_to_bf16(src[i])) bad++;
        if (h[i] != ws_f32_to_f16(src[i])) bad++;
        if (q[i] != ws_f32_to_fp8e4m3(src[i])) bad++;
    }
    CHECK(bad == 0);
    /* bf16 -> f16 rounds once, from the exact f32 value. */
    ws_convert_host(h2, WS_F16, bf, WS_BF16, N);
    for (int i = 0; i < N; i++)
        if (h2[i] != ws_f32_to_f16(ws_bf16_to_f32(bf[i]))) bad++;
    CHECK(bad == 0);
    float back[N];
    ws_convert_host(back, WS_F32, q, WS_FP8E4M3, N);
    for (int i = 0; i < N; i++)
        if (bits_of(back[i]) != bits_of(ws_fp8e4m3_to_f32(q[i]))) bad++;
    CHECK(bad == 0);
}

/* The vectorized f32<->bf16 batch paths give the scalar functions' bits for
 * every bf16 pattern and for f32 specials, ties and the values next to them. */
static void test_convert_host_bf16_batch(void)
{
    enum { N = 65536 };
    static uint16_t all[N], back[N];
    static float wide[N];
    for (int i = 0; i < N; i++) all[i] = (uint16_t)i;
    ws_convert_host(wide, WS_F32, all, WS_BF16, N);
    int bad = 0;
    for (int i = 0; i < N; i++)
        if (bits_of(wide[i]) != bits_of(ws_bf16_to_f32(all[i]))) bad++;
    ws_convert_host(back, WS_BF16, wide, WS_F32, N);
    for (int i = 0; i < N; i++)
        if (back[i] != ws_f32_to_bf16(wide[i])) bad++;
    CHECK(bad == 0);
    const uint32_t special[] = {0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00001u, 0x7F800001u,
                                0x00000000u, 0x80000000u, 0x00000001u, 0x007FFFFFu, 0x3F808000u,
                                0x3F818000u, 0x3F808001u, 0x3F807FFFu, 0x7F7FFFFFu, 0xFF7F8000u,
                                0x7F7F8000u, 0x80008000u};
    enum { S = sizeof special / sizeof special[0] };
    float in[S];
    uint16_t out[S];
    for (int i = 0; i < S; i++) in[i] = f32_of(special[i]);
    ws_convert_host(out, WS_BF16, in, WS_F32, S);
    for (int i = 0; i < S; i++) CHECK_EQ_U64(out[i], ws_f32_to_bf16(in[i]));
    CHECK_EQ_U64(out[9], 0x3F80);  /* tie, even below: stays */
    CHECK_EQ_U64(out[10], 0x3F82); /* tie, odd below: rounds up */
    CHECK_EQ_U64(out[13], 0x7F80); /* largest f32 rounds to inf */
    CHECK_EQ_U64(out[4] & 0x7FC0, 0x7FC0); /* signalling NaN comes out quiet */
}

static void test_convert_host_ints(void)
{
    float f[] = {-2.7f, 2.7f, 3e10f, -3e10f, NAN, -0.0f, 255.9f, 300.0f};
    int32_t i32[8];
    uint8_t u8[8];
    int64_t i64[8];
    ws_convert_host(i32, WS_I32, f, WS_F32, 8);
    CHECK(i32[0] == -2 && i32[1] == 2); /* truncation toward zero */
    CHECK(i32[2] == INT32_MAX && i32[3] == INT32_MIN); /* saturation */
    CHECK(i32[4] == 0 && i32[5] == 0);
    ws_convert_host(u8, WS_U8, f, WS_F32, 8);
    CHECK(u8[0] == 0 && u8[1] == 2 && u8[6] == 255 && u8[7] == 255);
    ws_convert_host(i64, WS_I64, f, WS_F32, 8);
    CHECK(i64[2] == 30000001024LL); /* 3e10f is exactly 30000001024 */
    int64_t big[3] = {INT64_MAX, -5, 70000};
    int32_t small[3];
    uint8_t bytes[3];
    ws_convert_host(small, WS_I32, big, WS_I64, 3);
    CHECK(small[0] == INT32_MAX && small[1] == -5 && small[2] == 70000);
    ws_convert_host(bytes, WS_U8, big, WS_I64, 3);
    CHECK(bytes[0] == 255 && bytes[1] == 0 && bytes[2] == 255);
    int32_t in[2] = {16777217, -3};
    float out[2];
    ws_convert_host(out, WS_F32, in, WS_I32, 2);
    CHECK(out[0] == 16777216.0f && out[1] == -3.0f); /* 2^24 + 1 rounds to even */
    uint16_t b[2];
    ws_convert_host(b, WS_BF16, in, WS_I32, 2);
    CHECK_EQ_U64(b[1], 0xC040);
}

static void test_scalars_and_bits(void)
{
    unsigned char buf[8];
    ws_store_scalar(buf, WS_BF16, 1.0);
    CHECK_EQ_U64(ws_load_bits(buf, WS_BF16), 0x3F80);
    CHECK(ws_load_scalar(buf, WS_BF16) == 1.0);
    ws_store_scalar(buf, WS_I32, -1.0);
    CHECK_EQ_U64(ws_load_bits(buf, WS_I32), 0xFFFFFFFFull); /* zero-extended */
    ws_store_scalar(buf, WS_FP8E4M3, -448.0);
    CHECK_EQ_U64(ws_load_bits(buf, WS_FP8E4M3), 0xFE);
    ws_store_scalar(buf, WS_I64, -123456789012.0);
    CHECK(ws_load_scalar(buf, WS_I64) == -123456789012.0);
    ws_store_scalar(buf, WS_F16, 65504.0);
    CHECK_EQ_U64(ws_load_bits(buf, WS_F16), 0x7BFF);
}

static void test_errors(void)
{
    ws_errclear();
    CHECK(ws_errcode() == WS_OK);
    CHECK(WS_ERR(WS_ERR_ARG, "bad %s", "thing") == WS_ERR_ARG);
    CHECK(strcmp(ws_errmsg(), "bad thing") == 0);
    CHECK(strstr(ws_errloc(), "test_dtype.c:") != NULL);
    ws_errprefix("doing %d", 3);
    CHECK(strcmp(ws_errmsg(), "doing 3: bad thing") == 0);
    CHECK(ws_errcode() == WS_ERR_ARG);
    CHECK(strcmp(ws_status_name(WS_ERR_DISCARDED), "ERR_DISCARDED") == 0);
    char longmsg[3000];
    memset(longmsg, 'x', sizeof longmsg - 1);
    longmsg[sizeof longmsg - 1] = 0;
    WS_ERR(WS_ERR_IO, "%s", longmsg); /* truncated, never overflows */
    ws_errprefix("%s", longmsg);
    CHECK(strlen(ws_errmsg()) < 1100);
}

int main(void)
{
    RUN(test_names_and_sizes);
    RUN(test_bf16_table);
    RUN(test_f16_table);
    RUN(test_fp8_table);
    RUN(test_round_trips_exhaustive);
    RUN(test_widening_every_code);
    RUN(test_narrowing_every_code);
    RUN(test_narrowing_specials);
    RUN(test_integer_saturation);
    RUN(test_fp8_matches_brute_force);
    RUN(test_f16_matches_brute_force);
    RUN(test_convert_host_floats);
    RUN(test_convert_host_bf16_batch);
    RUN(test_convert_host_ints);
    RUN(test_scalars_and_bits);
    RUN(test_errors);
    return check_summary();
}
