/* dtype.c: element types, scalar access and bulk conversion on the host.
 *
 * The element conversions themselves are in dtype_convert.h (shared with the
 * CUDA kernels); this file holds the loops over them. Int->float rounds once
 * (i64 beyond 2^53 goes through double, so it may round twice). */
#include "dtype.h"

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

/* ---- scalar access ---------------------------------------------------------- */

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
    case WS_U8: *(uint8_t *)p = (uint8_t)ws_sat_from_double(v, 0, 255); return;
    case WS_I32: {
        int32_t i = (int32_t)ws_sat_from_double(v, INT32_MIN, INT32_MAX);
        memcpy(p, &i, 4);
        return;
    }
    case WS_I64: {
        int64_t i = ws_sat_from_double(v, INT64_MIN, INT64_MAX);
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
    case WS_U8: *(uint8_t *)p = (uint8_t)ws_sat_int(v, 0, 255); break;
    case WS_I32: {
        int32_t i = (int32_t)ws_sat_int(v, INT32_MIN, INT32_MAX);
        memcpy(p, &i, 4);
        break;
    }
    default: memcpy(p, &v, 8); break;
    }
}

/* The pairs every f32-master sync runs over all weights: the scalar
 * conversions are branch-free, so these loops vectorize (AVX-512 where the
 * CPU has it). The source may be unaligned for a float: memcpy loads it. */
WS_CLONES_V4
static void f32_to_bf16_block(uint16_t *d, const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float f;
        memcpy(&f, s + 4 * i, 4);
        d[i] = ws_f32_to_bf16(f);
    }
}

WS_CLONES_V4
static void bf16_to_f32_block(unsigned char *d, const uint16_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float f = ws_bf16_to_f32(s[i]);
        memcpy(d + 4 * i, &f, 4);
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
