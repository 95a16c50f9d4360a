/* bind_quant.c: the Lua face of block-scaled FP8 quantization (quant.h):
 * ws.quantize_fp8_block (the sync's batched call), its reference twin for
 * verification, the error measure and the scales' shape. Misuse (dtypes,
 * shapes, discarded contents) raises; a device that fails or runs out of
 * memory returns nil, msg, code. */
#include <string.h>

#include "bind.h"
#include "quant.h"

static int result(lua_State *L, ws_status rc, const char *what)
{
    if (rc == WS_OK) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return ws_lua_fail(L, rc, what); /* raises for misuse codes */
}

/* ws.quantize_fp8_block(srcs, qs, scales) -> true: one call for all. */
static int l_quantize(lua_State *L)
{
    lua_settop(L, 3); /* [srcs, qs, scales]: the lists below push above */
    size_t n1, n2, n3;
    ws_tensor **srcs = ws_lua_check_tensor_list(L, 1, &n1);
    ws_tensor **qs = ws_lua_check_tensor_list(L, 2, &n2);
    ws_tensor **scales = ws_lua_check_tensor_list(L, 3, &n3);
    if (n1 != n2 || n1 != n3)
        return luaL_error(L, "quantize_fp8_block: %d sources, %d fp8 tensors and %d scales; "
                          "give one of each per weight", (int)n1, (int)n2, (int)n3);
    return result(L, ws_quantize_fp8_block((const ws_tensor *const *)srcs, qs, scales, n1),
                  "quantize_fp8_block");
}

/* ws.quantize_fp8_block_reference(src, q, scale) -> true (cpu tensors). */
static int l_reference(lua_State *L)
{
    ws_tensor *src = ws_lua_check_tensor(L, 1);
    ws_tensor *q = ws_lua_check_tensor(L, 2);
    ws_tensor *scale = ws_lua_check_tensor(L, 3);
    return result(L, ws_quantize_fp8_block_reference(src, q, scale),
                  "quantize_fp8_block_reference");
}

/* ws.fp8_block_error(src, q, scale) -> max over blocks of max|deq - x| / amax. */
static int l_error(lua_State *L)
{
    ws_tensor *src = ws_lua_check_tensor(L, 1);
    ws_tensor *q = ws_lua_check_tensor(L, 2);
    ws_tensor *scale = ws_lua_check_tensor(L, 3);
    double err;
    if (ws_fp8_block_error(src, q, scale, &err) != WS_OK) return ws_lua_raise(L, "fp8_block_error");
    lua_pushnumber(L, err);
    return 1;
}

/* ws.fp8_block_scale_shape(shape) -> the shape of its weight_scale_inv. */
static int l_scale_shape(lua_State *L)
{
    int64_t shape[WS_MAX_DIMS], out[WS_MAX_DIMS];
    int infer;
    int nd = ws_lua_read_shape(L, 1, "fp8_block_scale_shape", shape, 0, &infer);
    if (nd < 2) return luaL_argerror(L, 1, "a weight has at least 2 dimensions");
    ws_fp8_block_scale_shape(nd, shape, out);
    lua_createtable(L, nd, 0);
    for (int i = 0; i < nd; i++) {
        lua_pushinteger(L, (lua_Integer)out[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static const luaL_Reg funcs[] = {
    {"quantize_fp8_block", l_quantize},
    {"quantize_fp8_block_reference", l_reference},
    {"fp8_block_error", l_error},
    {"fp8_block_scale_shape", l_scale_shape},
    {NULL, NULL},
};

void ws_open_quant(lua_State *L)
{
    /* [ws] */
    luaL_setfuncs(L, funcs, 0);
    lua_pushinteger(L, WS_FP8_BLOCK);
    lua_setfield(L, -2, "FP8_BLOCK");
}
