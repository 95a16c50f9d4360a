/* dtype.c: element types and bit-exact scalar conversions.
 *
 * Narrowing float conversions round to nearest, ties to even, on the integer
 * bits (never through the FPU's rounding mode), so CPU and GPU agree bit for
 * bit. NaN handling (the CUDA kernels must do the same):
 *   - every NaN produced is quiet, keeps its sign and the top payload bits
 *     that fit (f32->bf16: bits>>16 | 0x0040; f32->f16: sign|0x7E00|m>>13;
 *     widening shifts the payload up and sets the quiet bit);
 *   - fp8 e4m3fn has no infinity: like PyTorch's float8_e4m3fn, +-inf, NaN
 *     and anything that rounds beyond 448 (|x| > 464, and 464 itself rounds
 *     to 448 by ties-to-even) become 0x7F with the input's sign; 0x7F/0xFF
 *     decode to sign|0x7FF00000 (the payload 111 shifted up), as PyTorch does.
 *   - f16 and bf16 overflow to +-inf.
 * Integers: float->int truncates toward zero and saturates to the target's
 * range (NaN -> 0); int->int saturates; int->float rounds once (i64 beyond
 * 2^53 goes through double, so it may round twice). */
#include "dtype.h"

#include <math.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtype_info[WS_DTYPE_COUNT] = {
    [WS_F32] = {"f32", 4},    [WS_BF16] = {"bf16", 2}, [WS_F16] = {"f16", 2},
    [WS_FP8E4M3] = {"fp8", 1}, [WS_U8] = {"u8", 1},     [WS_I32] = {"i32", 4},
    [WS_I64] = {"i64", 8},
};

size_t ws_dtype_size(ws_dtype t)
{
    return (unsigned)t < WS_DTYPE_COUNT ? dtype_info[t].size : 0;
}

const char *ws_dtype_name(ws_dtype t)
{
    return (unsigned)t < WS_DTYPE_COUNT ? dtype_info[t].name : "?";
}

int ws_dtype_parse(const char *name, ws_dtype *out)
{
    static const struct {
        const char *alias;
        ws_dtype t;
    } aliases[] = {
        {"f32", WS_F32},           {"float32", WS_F32},   {"float", WS_F32},
        {"bf16", WS_BF16},         {"bfloat16", WS_BF16}, {"f16", WS_F16},
        {"float16", WS_F16},       {"half", WS_F16},      {"fp8", WS_FP8E4M3},
        {"fp8e4m3", WS_FP8E4M3},   {"float8_e4m3fn", WS_FP8E4M3},
        {"u8", WS_U8},             {"uint8", WS_U8},      {"i32", WS_I32},
        {"int32", WS_I32},         {"i64", WS_I64},       {"int64", WS_I64},
    };
    if (!name) return -1;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++) {
        if (strcmp(name, aliases[i].alias) == 0) {
            *out = aliases[i].t;
            return 0;
        }
    }
    return -1;
}

int ws_dtype_is_float(ws_dtype t)
{
    return t == WS_F32 || t == WS_BF16 || t == WS_F16 || t == WS_FP8E4M3;
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* v >> shift, rounded to nearest, ties to even. */
static uint32_t shift_rne(uint32_t v, unsigned shift)
{
    if (shift == 0) return v;
    if (shift >= 32) return 0; /* callers pass v < 2^31: below half an ulp */
    uint32_t q = v >> shift;
    uint32_t rem = v & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return q;
}

/* Magnitude of finite |f| (bits a) in a small float format with `mbits`
 * mantissa bits whose smallest normal has f32 biased exponent `min_exp`.
 * The result may carry into the exponent (and past the largest finite
 * value); callers handle overflow. */
static uint32_t narrow_magnitude(uint32_t a, unsigned mbits, uint32_t min_exp)
{
    uint32_t exp = a >> 23, mant = a & 0x7FFFFF;
    if (exp >= min_exp) {
        /* Rebias so the target exponent field starts at 1 for min_exp. */
        uint32_t v = ((exp - min_exp + 1) << 23) | mant;
        return shift_rne(v, 23 - mbits);
    }
    /* Target subnormal: value = sig * 2^(exp-150); unit = 2^(min_exp-127-mbits). */
    uint32_t sig = exp ? (mant | 0x800000) : mant;
    uint32_t e = exp ? exp : 1;
    return shift_rne(sig, 23 - mbits + (min_exp - e));
}

uint16_t ws_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x0040);
    /* Same exponent range as f32: rounding the low half is all there is;
     * a carry into the exponent correctly overflows to inf. */
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float ws_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    if ((u & 0x7FFFFFFF) > 0x7F800000) u |= 0x00400000;
    return bits_f32(u);
}

uint16_t ws_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7FFFFFFF;
    if (a > 0x7F800000) return (uint16_t)(sign | 0x7E00 | ((a & 0x7FFFFF) >> 13));
    if (a >= 0x47800000) return sign | 0x7C00; /* >= 2^16 (and inf): overflow */
    uint32_t m = narrow_magnitude(a, 10, 113); /* smallest f16 normal 2^-14 */
    if (m >= 0x7C00) return sign | 0x7C00;     /* rounded past 65504 */
    return (uint16_t)(sign | m);
}

float ws_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    if (exp == 0x1F) {
        uint32_t u = sign | 0x7F800000 | (mant << 13);
        if (mant) u |= 0x00400000;
        return bits_f32(u);
    }
    if (exp == 0) {
        /* Subnormal (or zero): mant * 2^-24 is exact in f32. */
        float v = ldexpf((float)mant, -24);
        return bits_f32(f32_bits(v) | sign);
    }
    return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

uint8_t ws_f32_to_fp8e4m3(float f)
{
    uint32_t u = f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7FFFFFFF;
    if (a >= 0x43F00000) return sign | 0x7F; /* >= 480, inf, NaN */
    uint32_t m = narrow_magnitude(a, 3, 121); /* smallest e4m3 normal 2^-6 */
    if (m > 0x7E) return sign | 0x7F;         /* (464, 480) rounds to the NaN slot */
    return (uint8_t)(sign | m);
}

float ws_fp8e4m3_to_f32(uint8_t v)
{
    uint32_t sign = (uint32_t)(v & 0x80) << 24;
    uint32_t exp = (v >> 3) & 0xF, mant = v & 0x7;
    if (exp == 0xF && mant == 0x7) return bits_f32(sign | 0x7FF00000);
    if (exp == 0) {
        float x = ldexpf((float)mant, -9);
        return bits_f32(f32_bits(x) | sign);
    }
    return bits_f32(sign | ((exp + 120) << 23) | (mant << 20));
}

/* ---- scalar access ---------------------------------------------------------- */

static int64_t sat_i64_from_double(double v, int64_t lo, int64_t hi)
{
    if (isnan(v)) return 0;
    v = trunc(v);
    /* Compare in double: (double)hi may round up, so test >= before casting. */
    if (v <= (double)lo) return lo;
    if (v >= (double)hi) return hi;
    return (int64_t)v;
}

double ws_load_scalar(const void *p, ws_dtype t)
{
    switch (t) {
    case WS_F32: { float f; memcpy(&f, p, 4); return f; }
    case WS_BF16: { uint16_t h; memcpy(&h, p, 2); return ws_bf16_to_f32(h); }
    case WS_F16: { uint16_t h; memcpy(&h, p, 2); return ws_f16_to_f32(h); }
    case WS_FP8E4M3: return ws_fp8e4m3_to_f32(*(const uint8_t *)p);
    case WS_U8: return *(const uint8_t *)p;
    case WS_I32: { int32_t i; memcpy(&i, p, 4); return i; }
    case WS_I64: { int64_t i; memcpy(&i, p, 8); return (double)i; }
    case WS_DTYPE_COUNT: break;
    }
    return 0.0;
}

void ws_store_scalar(void *p, ws_dtype t, double v)
{
    switch (t) {
    case WS_F32: { float f = (float)v; memcpy(p, &f, 4); return; }
    case WS_BF16: { uint16_t h = ws_f32_to_bf16((float)v); memcpy(p, &h, 2); return; }
    case WS_F16: { uint16_t h = ws_f32_to_f16((float)v); memcpy(p, &h, 2); return; }
    case WS_FP8E4M3: *(uint8_t *)p = ws_f32_to_fp8e4m3((float)v); return;
    case WS_U8: *(uint8_t *)p = (uint8_t)sat_i64_from_double(v, 0, 255); return;
    case WS_I32: {
        int32_t i = (int32_t)sat_i64_from_double(v, INT32_MIN, INT32_MAX);
        memcpy(p, &i, 4);
        return;
    }
    case WS_I64: {
        int64_t i = sat_i64_from_double(v, INT64_MIN, INT64_MAX);
        memcpy(p, &i, 8);
        return;
    }
    case WS_DTYPE_COUNT: break;
    }
}

uint64_t ws_load_bits(const void *p, ws_dtype t)
{
    switch (ws_dtype_size(t)) {
    case 1: return *(const uint8_t *)p;
    case 2: { uint16_t v; memcpy(&v, p, 2); return v; }
    case 4: { uint32_t v; memcpy(&v, p, 4); return v; }
    case 8: { uint64_t v; memcpy(&v, p, 8); return v; }
    default: return 0;
    }
}

/* ---- bulk conversion ---------------------------------------------------------- */

static int64_t load_int(const void *p, ws_dtype t)
{
    switch (t) {
    case WS_U8: return *(const uint8_t *)p;
    case WS_I32: { int32_t i; memcpy(&i, p, 4); return i; }
    default: { int64_t i; memcpy(&i, p, 8); return i; }
    }
}

static void store_int(void *p, ws_dtype t, int64_t v)
{
    switch (t) {
    case WS_U8: *(uint8_t *)p = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); break;
    case WS_I32: {
        int32_t i = (int32_t)(v < INT32_MIN ? INT32_MIN : v > INT32_MAX ? INT32_MAX : v);
        memcpy(p, &i, 4);
        break;
    }
    default: memcpy(p, &v, 8); break;
    }
}

/* The pairs every f32-master sync runs over all weights, as branch-free
 * loops the vectorizer turns into AVX-512 where the CPU has it. Same bits as
 * ws_f32_to_bf16 / ws_bf16_to_f32 (tested against them). */
WS_CLONES_V4
static void f32_to_bf16_block(uint16_t *d, const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, s + 4 * i, 4);
        uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        uint32_t quiet = (u >> 16) | 0x0040u;
        d[i] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);
    }
}

WS_CLONES_V4
static void bf16_to_f32_block(unsigned char *d, const uint16_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)s[i] << 16;
        u |= (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x00400000u : 0u;
        memcpy(d + 4 * i, &u, 4);
    }
}

/* Float-to-float: decode to f32 (exact for every narrower float), then
 * encode once, so there is a single rounding. Loops are per pair so the
 * compiler can keep them tight. */
static void convert_floats(void *dst, ws_dtype dt, const void *src, ws_dtype st, size_t n)
{
    float buf[256];
    for (size_t done = 0; done < n;) {
        size_t k = n - done < 256 ? n - done : 256;
        switch (st) {
        case WS_F32: memcpy(buf, (const float *)src + done, k * 4); break;
        case WS_BF16: {
            const uint16_t *s = (const uint16_t *)src + done;
            for (size_t i = 0; i < k; i++) buf[i] = ws_bf16_to_f32(s[i]);
            break;
        }
        case WS_F16: {
            const uint16_t *s = (const uint16_t *)src + done;
            for (size_t i = 0; i < k; i++) buf[i] = ws_f16_to_f32(s[i]);
            break;
        }
        default: {
            const uint8_t *s = (const uint8_t *)src + done;
            for (size_t i = 0; i < k; i++) buf[i] = ws_fp8e4m3_to_f32(s[i]);
            break;
        }
        }
        switch (dt) {
        case WS_F32: memcpy((float *)dst + done, buf, k * 4); break;
        case WS_BF16: {
            uint16_t *d = (uint16_t *)dst + done;
            for (size_t i = 0; i < k; i++) d[i] = ws_f32_to_bf16(buf[i]);
            break;
        }
        case WS_F16: {
            uint16_t *d = (uint16_t *)dst + done;
            for (size_t i = 0; i < k; i++) d[i] = ws_f32_to_f16(buf[i]);
            break;
        }
        default: {
            uint8_t *d = (uint8_t *)dst + done;
            for (size_t i = 0; i < k; i++) d[i] = ws_f32_to_fp8e4m3(buf[i]);
            break;
        }
        }
        done += k;
    }
}

void ws_convert_host(void *dst, ws_dtype dt, const void *src, ws_dtype st, size_t n)
{
    size_t ds = ws_dtype_size(dt), ss = ws_dtype_size(st);
    if (n == 0) return; /* empty tensors may have NULL data */
    if (dt == st) {
        memmove(dst, src, n * ds);
        return;
    }
    if (st == WS_F32 && dt == WS_BF16) {
        f32_to_bf16_block(dst, src, n);
        return;
    }
    if (st == WS_BF16 && dt == WS_F32) {
        bf16_to_f32_block(dst, src, n);
        return;
    }
    if (ws_dtype_is_float(dt) && ws_dtype_is_float(st)) {
        convert_floats(dst, dt, src, st, n);
        return;
    }
    char *d = dst;
    const char *s = src;
    if (!ws_dtype_is_float(dt) && !ws_dtype_is_float(st)) {
        for (size_t i = 0; i < n; i++) store_int(d + i * ds, dt, load_int(s + i * ss, st));
        return;
    }
    if (st == WS_I64 && dt == WS_F32) {
        /* One rounding straight to f32 rather than two through double. */
        for (size_t i = 0; i < n; i++) {
            float f = (float)load_int(s + i * ss, st);
            memcpy(d + i * ds, &f, 4);
        }
        return;
    }
    for (size_t i = 0; i < n; i++) ws_store_scalar(d + i * ds, dt, ws_load_scalar(s + i * ss, st));
}
