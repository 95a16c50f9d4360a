/* bind_safetensors.c: the Lua face of safetensors checkpoints
 * (ws.safetensors, ws.Checkpoint).
 *
 * A checkpoint that cannot be opened or is malformed is an environment
 * failure: nil, message, "io" or "format", so a policy can fall back. Its
 * tensors are read-only zero-copy ws.Tensors; each holds its shard's mapping
 * in the core, so they stay valid after ck:free() or collection. */
#include <stdio.h>
#include <string.h>

#include "bind.h"
#include "checkpoint.h"

typedef struct lckpt {
    ws_ckpt *c;      /* NULL: freed */
    char label[256]; /* names the checkpoint once freed */
} lckpt;

static lckpt *check_lckpt(lua_State *L, int idx)
{
    return (lckpt *)luaL_checkudata(L, idx, WS_CHECKPOINT_MT);
}

static ws_ckpt *check_ckpt(lua_State *L, int idx)
{
    lckpt *lc = check_lckpt(L, idx);
    if (!lc->c) {
        lua_pushfstring(L, "'%s'", lc->label);
        ws_lua_raise_freed(L, idx, "checkpoint", lua_tostring(L, -1));
    }
    return lc->c;
}

/* ws.safetensors(path) -> ws.Checkpoint | nil, message, code */
static int l_safetensors(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TSTRING);
    const char *path = lua_tostring(L, 1);
    lckpt *lc = (lckpt *)lua_newuserdatauv(L, sizeof *lc, 0); /* released first */
    lc->c = NULL;
    snprintf(lc->label, sizeof lc->label, "%s", path);
    luaL_setmetatable(L, WS_CHECKPOINT_MT);
    ws_status rc = ws_ckpt_open(path, &lc->c);
    if (rc != WS_OK) return ws_lua_fail(L, rc, NULL);
    return 1;
}

static int c_names(lua_State *L)
{
    ws_ckpt *c = check_ckpt(L, 1);
    size_t n = ws_ckpt_count(c);
    lua_createtable(L, n < (size_t)INT32_MAX ? (int)n : 0, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushstring(L, ws_ckpt_name(c, i));
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

static int c_count(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)ws_ckpt_count(check_ckpt(L, 1)));
    return 1;
}

/* ck:info(name) -> {dtype=, shape=, numel=, nbytes=, file=} | nil */
static int c_info(lua_State *L)
{
    ws_ckpt *c = check_ckpt(L, 1);
    luaL_checktype(L, 2, LUA_TSTRING);
    size_t j;
    const ws_st_entry *e = ws_ckpt_find(c, lua_tostring(L, 2), &j);
    if (!e) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 5); /* [ck, name, info] */
    lua_pushstring(L, ws_dtype_name(e->dtype));
    lua_setfield(L, -2, "dtype");
    lua_createtable(L, e->ndim, 0); /* [ck, name, info, shape] */
    int64_t numel = 1;
    for (int d = 0; d < e->ndim; d++) {
        lua_pushinteger(L, (lua_Integer)e->shape[d]);
        lua_rawseti(L, -2, d + 1);
        numel *= e->shape[d];
    }
    lua_setfield(L, -2, "shape");
    lua_pushinteger(L, (lua_Integer)numel);
    lua_setfield(L, -2, "numel");
    lua_pushinteger(L, (lua_Integer)(e->end - e->begin));
    lua_setfield(L, -2, "nbytes");
    lua_pushstring(L, ws_ckpt_file_name(c, j));
    lua_setfield(L, -2, "file");
    return 1;
}

/* ck:tensor(name) -> ws.Tensor (read-only, zero-copy); raises when absent. */
static int c_tensor(lua_State *L)
{
    ws_ckpt *c = check_ckpt(L, 1);
    luaL_checktype(L, 2, LUA_TSTRING);
    const char *name = lua_tostring(L, 2);
    if (!ws_ckpt_find(c, name, NULL))
        return luaL_error(L, "tensor: safetensors checkpoint '%s' has no tensor '%s'; "
                             "ck:names() lists the ones it has", ws_ckpt_path(c), name);
    ws_ltensor *lt = ws_lua_new_tensor(L); /* [ck, name, t] released until filled */
    ws_status rc = ws_ckpt_tensor(c, name, &lt->t);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "tensor");
    return 1;
}

/* ck:metadata() -> {key = value} (strings) */
static int c_metadata(lua_State *L)
{
    ws_ckpt *c = check_ckpt(L, 1);
    size_t n = ws_ckpt_metadata_count(c);
    lua_createtable(L, 0, n < (size_t)INT32_MAX ? (int)n : 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushstring(L, ws_ckpt_metadata_value(c, i));
        lua_setfield(L, -2, ws_ckpt_metadata_key(c, i));
    }
    return 1;
}

/* ck:files() -> {"model-00001-of-00002.safetensors", ...} */
static int c_files(lua_State *L)
{
    ws_ckpt *c = check_ckpt(L, 1);
    size_t n = ws_ckpt_file_count(c);
    lua_createtable(L, (int)n, 0);
    for (size_t j = 0; j < n; j++) {
        lua_pushstring(L, ws_ckpt_file_name(c, j));
        lua_rawseti(L, -2, (lua_Integer)j + 1);
    }
    return 1;
}

static int c_path(lua_State *L)
{
    lua_pushstring(L, ws_ckpt_path(check_ckpt(L, 1)));
    return 1;
}

/* free(), __gc and __close: idempotent. Tensors already handed out keep
 * their own references to the mapped files. */
static int c_free(lua_State *L)
{
    lckpt *lc = check_lckpt(L, 1);
    ws_ckpt *c = lc->c;
    lc->c = NULL;
    ws_ckpt_free(c);
    return 0;
}

static int c_tostring(lua_State *L)
{
    lckpt *lc = check_lckpt(L, 1);
    if (!lc->c) {
        lua_pushfstring(L, "ws.Checkpoint('%s' freed)", lc->label);
        return 1;
    }
    size_t nf = ws_ckpt_file_count(lc->c), nt = ws_ckpt_count(lc->c);
    lua_pushfstring(L, "ws.Checkpoint('%s', %I file%s, %I tensor%s)", ws_ckpt_path(lc->c),
                    (lua_Integer)nf, nf == 1 ? "" : "s", (lua_Integer)nt, nt == 1 ? "" : "s");
    return 1;
}

static const luaL_Reg c_methods[] = {
    {"names", c_names},       {"count", c_count}, {"info", c_info},
    {"tensor", c_tensor},     {"metadata", c_metadata},
    {"files", c_files},       {"path", c_path},   {"free", c_free},
    {NULL, NULL},
};

static const luaL_Reg c_meta[] = {
    {"__gc", c_free},
    {"__close", c_free},
    {"__len", c_count},
    {"__tostring", c_tostring},
    {NULL, NULL},
};

void ws_open_safetensors(lua_State *L)
{
    /* [ws] */
    ws_lua_new_type(L, WS_CHECKPOINT_MT, c_methods, c_meta, NULL);
    lua_pushcfunction(L, l_safetensors);
    lua_setfield(L, -2, "safetensors");
}
