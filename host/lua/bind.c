/* bind.c: helpers shared by the binding files: turning core errors into Lua
 * errors or `nil, message, code` returns, checking tensor arguments, and
 * reading lists of tensors without leaking on a Lua error.
 *
 * Error regimes (docs/lua-api.md):
 *   raise:  ERR_ARG, ERR_FREED, ERR_DISCARDED, ERR_UNSUPPORTED,
 *           ERR_INTERRUPTED (misuse, or the user asked to stop);
 *   return: ERR_NOMEM, ERR_DEVICE, ERR_IO, ERR_FORMAT, ERR_COMM, ERR_TIMEOUT
 *           (the environment) as nil, message, code — only from constructors
 *           and calls documented to do so (ws.device, ws.tensor, t:to,
 *           ws.pool, pool:tensor, pool:sleep, pool:wake, ws.plan,
 *           ws.checksums). Every other function raises whatever the code.
 *
 * Messages say each thing once: the binding puts the Lua-facing name in front
 * ("ws.pool: "), the core says what it was doing to what ("creating pool
 * 'kv_cache'"), the device backend names itself ("cpu: out of memory ..."),
 * and the library's errors.must adds the role ("engine: "). */
#include <signal.h>
#include <string.h>

#include "bind.h"

static volatile sig_atomic_t interrupted_flag;

void ws_lua_set_interrupted(void) { interrupted_flag = 1; }
int ws_lua_is_interrupted(void) { return interrupted_flag != 0; }

const char *ws_lua_code_name(ws_status rc)
{
    switch (rc) {
    case WS_OK: return "ok";
    case WS_ERR_ARG: return "arg";
    case WS_ERR_NOMEM: return "nomem";
    case WS_ERR_DEVICE: return "device";
    case WS_ERR_COMM: return "comm";
    case WS_ERR_IO: return "io";
    case WS_ERR_FORMAT: return "format";
    case WS_ERR_DISCARDED: return "discarded";
    case WS_ERR_FREED: return "freed";
    case WS_ERR_UNSUPPORTED: return "unsupported";
    case WS_ERR_INTERRUPTED: return "interrupted";
    case WS_ERR_TIMEOUT: return "timeout";
    }
    return "unknown";
}

/* The core message, with the Lua-facing name `what` in front unless the core
 * already starts with that operation ("checksum: ...", "copy_ 'w' (cpu) <-
 * ...", "sleep(level=1) of pool ..."): each says so once. */
static const char *push_message(lua_State *L, const char *what)
{
    const char *msg = ws_errmsg();
    if (!msg || !*msg) msg = ws_status_name(ws_errcode());
    size_t n = what ? strlen(what) : 0;
    if (!what || (strncmp(msg, what, n) == 0 && strchr(":( ", msg[n]) && msg[n]))
        return lua_pushstring(L, msg);
    return lua_pushfstring(L, "%s: %s", what, msg);
}

int ws_lua_raise(lua_State *L, const char *what)
{
    luaL_where(L, 1); /* as luaL_error: where the Lua caller is */
    push_message(L, what);
    lua_concat(L, 2);
    return lua_error(L);
}

int ws_lua_fail(lua_State *L, ws_status rc, const char *what)
{
    switch (rc) {
    case WS_ERR_NOMEM:
    case WS_ERR_DEVICE:
    case WS_ERR_IO:
    case WS_ERR_FORMAT:
    case WS_ERR_COMM:
    case WS_ERR_TIMEOUT:
        lua_pushnil(L);
        push_message(L, what);
        lua_pushstring(L, ws_lua_code_name(rc));
        return 3;
    default:
        return ws_lua_raise(L, what);
    }
}

ws_ltensor *ws_lua_check_ltensor(lua_State *L, int idx)
{
    return (ws_ltensor *)luaL_checkudata(L, idx, WS_TENSOR_MT);
}

const char *ws_lua_push_freed(lua_State *L, const char *type, const char *label)
{
    return lua_pushfstring(L, "%s %s was freed (free(), <close> or garbage collection); create "
                              "it again",
                           type, label);
}

int ws_lua_raise_freed(lua_State *L, int idx, const char *type, const char *label)
{
    return luaL_argerror(L, idx, ws_lua_push_freed(L, type, label));
}

/* A freed tensor keeps its label in user value 2 (set by the release in
 * bind_tensor.c) so later misuse can still name it. */
static const char *freed_label(lua_State *L, int idx)
{
    if (lua_getiuservalue(L, idx, 2) == LUA_TSTRING) return lua_tostring(L, -1);
    return "<unnamed>";
}

static int raise_freed(lua_State *L, int idx)
{
    return ws_lua_raise_freed(L, idx, "tensor", freed_label(L, idx));
}

void ws_lua_check_options(lua_State *L, int idx, const char *const *keys, const char *fname)
{
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) { /* [..., key, value] */
        lua_pop(L, 1);
        int ok = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            for (int i = 0; keys[i] && !ok; i++) ok = strcmp(keys[i], lua_tostring(L, -1)) == 0;
        if (ok) continue;
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (int i = 0; keys[i]; i++) {
            if (i) luaL_addstring(&b, ", ");
            luaL_addstring(&b, keys[i]);
        }
        luaL_pushresult(&b); /* [..., key, valid] */
        if (lua_type(L, -2) == LUA_TSTRING)
            luaL_error(L, "%s: unknown option '%s' (valid: %s)", fname, lua_tostring(L, -2),
                       lua_tostring(L, -1));
        else
            luaL_error(L, "%s: options must have string keys, got a %s key (valid: %s)", fname,
                       luaL_typename(L, -2), lua_tostring(L, -1));
    }
}

void ws_lua_new_type(lua_State *L, const char *name, const luaL_Reg *methods,
                     const luaL_Reg *meta, lua_CFunction index)
{
    luaL_newmetatable(L, name); /* [mt] */
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L); /* [mt, methods] */
    luaL_setfuncs(L, methods, 0);
    if (index) lua_pushcclosure(L, index, 1); /* [mt, index] */
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

ws_tensor *ws_lua_check_tensor(lua_State *L, int idx)
{
    ws_ltensor *lt = ws_lua_check_ltensor(L, idx);
    if (ws_tensor_is_released(&lt->t)) raise_freed(L, idx);
    return &lt->t;
}

void ws_lua_push_int_fields(lua_State *L, const ws_lua_int_field *f, int n, int more)
{
    lua_createtable(L, 0, n + more);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, f[i].value);
        lua_setfield(L, -2, f[i].name);
    }
}

ws_ltensor *ws_lua_new_tensor(lua_State *L)
{
    /* user value 1: what this tensor keeps alive (its base or its pool);
     * user value 2: its label once freed. */
    ws_ltensor *lt = (ws_ltensor *)lua_newuserdatauv(L, sizeof *lt, 2);
    memset(lt, 0, sizeof *lt);
    luaL_setmetatable(L, WS_TENSOR_MT);
    return lt;
}

ws_tensor **ws_lua_check_tensor_list(lua_State *L, int idx, size_t *n)
{
    idx = lua_absindex(L, idx);
    luaL_checktype(L, idx, LUA_TTABLE);
    size_t count = (size_t)lua_rawlen(L, idx);
    /* The array lives in a userdata so a Lua error below frees it with the GC;
     * the tensors themselves stay referenced by the table. */
    ws_tensor **list = (ws_tensor **)lua_newuserdatauv(L, (count ? count : 1) * sizeof *list, 0);
    /* [..., list] */
    for (size_t i = 0; i < count; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1); /* [..., list, item] */
        ws_ltensor *lt = (ws_ltensor *)luaL_testudata(L, -1, WS_TENSOR_MT);
        if (!lt) {
            const char *got = luaL_typename(L, -1);
            luaL_argerror(L, idx,
                          lua_pushfstring(L, "item %d: ws.Tensor expected, got %s",
                                          (int)i + 1, got));
        }
        if (ws_tensor_is_released(&lt->t)) {
            const char *label = freed_label(L, -1);
            luaL_argerror(L, idx,
                          lua_pushfstring(L, "item %d: %s", (int)i + 1,
                                          ws_lua_push_freed(L, "tensor", label)));
        }
        list[i] = &lt->t;
        lua_pop(L, 1); /* [..., list] */
    }
    *n = count;
    return list;
}
