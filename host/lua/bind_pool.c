/* bind_pool.c: the Lua face of sleepable memory pools (ws.pool, ws.Pool).
 *
 * Tensors carved from a pool keep its userdata alive (their user value 1), so
 * the pool is collected only after them; lua_close finalizes newer objects
 * first, which also frees pool tensors before their pool. pool:free() with
 * live tensors raises naming one of them (the core refuses). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "bind.h"

typedef struct lpool {
    ws_pool *p; /* NULL: freed */
    char tag[64]; /* names the pool once freed */
} lpool;

static lpool *check_lpool(lua_State *L, int idx)
{
    return (lpool *)luaL_checkudata(L, idx, WS_POOL_MT);
}

ws_pool *ws_lua_check_pool(lua_State *L, int idx)
{
    lpool *lp = check_lpool(L, idx);
    if (!lp->p) {
        lua_pushfstring(L, "'%s'", lp->tag);
        ws_lua_raise_freed(L, idx, "pool", lua_tostring(L, -1));
    }
    return lp->p;
}

static const char *const pool_keys[] = {"device", "tag", "bytes", "reserve_only", NULL};

/* ws.pool{device=, tag=, bytes=, reserve_only=} -> pool | nil, msg, code.
 * reserve_only: address space only, asleep until woken (dry runs). */
static int l_pool(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    ws_lua_check_options(L, 1, pool_keys, "ws.pool");
    ws_device *dev;
    if (lua_getfield(L, 1, "device") != LUA_TNIL) { /* [opts, device] */
        ws_status rc = ws_lua_to_device(L, -1, &dev);
        if (rc != WS_OK) return ws_lua_fail(L, rc, "ws.pool");
    } else {
        dev = ws_lua_default_device(L);
    }
    lua_pop(L, 1);
    const char *tag = "pool";
    if (lua_getfield(L, 1, "tag") != LUA_TNIL) { /* stays on the stack: keeps the string */
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "ws.pool: tag must be a string, got %s", luaL_typename(L, -1));
        tag = lua_tostring(L, -1);
    }
    lua_getfield(L, 1, "bytes");
    int isint = 0;
    lua_Integer bytes = lua_tointegerx(L, -1, &isint);
    if (!isint || bytes <= 0)
        return luaL_error(L, "ws.pool: bytes must be an integer > 0, got %s",
                          luaL_tolstring(L, -1, NULL));
    lua_pop(L, 1);
    int reserve_only = 0;
    if (lua_getfield(L, 1, "reserve_only") != LUA_TNIL) {
        if (!lua_isboolean(L, -1))
            return luaL_error(L, "ws.pool: reserve_only must be a boolean, got %s",
                              luaL_typename(L, -1));
        reserve_only = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);

    lpool *lp = (lpool *)lua_newuserdatauv(L, sizeof *lp, 0); /* released first */
    lp->p = NULL;
    luaL_setmetatable(L, WS_POOL_MT);
    ws_status rc = reserve_only ? ws_pool_reserve(dev, tag, (size_t)bytes, &lp->p)
                                : ws_pool_create(dev, tag, (size_t)bytes, &lp->p);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "ws.pool");
    snprintf(lp->tag, sizeof lp->tag, "%s", ws_pool_tag(lp->p));
    return 1;
}

/* ws.pool_bytes(shapes, dtype) -> the capacity a pool needs to hold tensors
 * of these shapes (a list of shape tables) and dtype all at once, with the
 * allocator's own alignment. Never 0, so it is always a valid pool size. */
static int l_pool_bytes(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    ws_dtype dt = ws_lua_check_dtype(L, 2, "ws.pool_bytes");
    size_t total = 0;
    lua_Integer n = luaL_len(L, 1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i); /* [shape] */
        int64_t shape[WS_MAX_DIMS];
        int infer;
        char what[48];
        snprintf(what, sizeof what, "ws.pool_bytes: shapes[%d]", (int)i);
        int nd = ws_lua_read_shape(L, -1, what, shape, 0, &infer);
        size_t bytes = ws_dtype_size(dt);
        for (int k = 0; k < nd; k++)
            if (__builtin_mul_overflow(bytes, (size_t)shape[k], &bytes))
                return luaL_error(L, "ws.pool_bytes: shapes[%d] is too large", (int)i);
        lua_pop(L, 1);
        size_t carved = ws_pool_carve_size(bytes);
        if (carved == SIZE_MAX || __builtin_add_overflow(total, carved, &total) ||
            total > (size_t)LUA_MAXINTEGER)
            return luaL_error(L, "ws.pool_bytes: the tensors add up to more than any pool holds");
    }
    lua_pushinteger(L, (lua_Integer)(total ? total : ws_pool_carve_size(1)));
    return 1;
}

static int p_tensor(lua_State *L)
{
    ws_pool *p = ws_lua_check_pool(L, 1);
    return ws_lua_tensor_from_opts(L, 2, p, 1, "pool:tensor");
}

/* pool:sleep(level [, note]) -> true | nil, msg, code */
static int p_sleep(lua_State *L)
{
    ws_pool *p = ws_lua_check_pool(L, 1);
    lua_Integer level = luaL_checkinteger(L, 2);
    if (level != 1 && level != 2)
        return luaL_argerror(L, 2, "level must be 1 (back up weights) or 2 (discard)");
    const char *note = luaL_optstring(L, 3, NULL);
    ws_status rc = ws_pool_sleep(p, (int)level, note);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "sleep");
    lua_pushboolean(L, 1);
    return 1;
}

static int p_wake(lua_State *L)
{
    ws_status rc = ws_pool_wake(ws_lua_check_pool(L, 1));
    if (rc != WS_OK) return ws_lua_fail(L, rc, "wake");
    lua_pushboolean(L, 1);
    return 1;
}

static int p_stats(lua_State *L)
{
    ws_pool_stats st;
    ws_pool_get_stats(ws_lua_check_pool(L, 1), &st);
    ws_lua_int_field fields[] = {{"capacity", (lua_Integer)st.capacity},
                                 {"used", (lua_Integer)st.used},
                                 {"mapped", (lua_Integer)st.mapped},
                                 {"backup_bytes", (lua_Integer)st.backup_bytes},
                                 {"backup_cached", (lua_Integer)st.backup_cached},
                                 {"sleeps", st.sleeps},
                                 {"last_level", st.last_level}};
    ws_lua_push_int_fields(L, fields, 7, 1);
    lua_pushboolean(L, st.asleep);
    lua_setfield(L, -2, "asleep");
    return 1;
}

static int p_tag(lua_State *L)
{
    lua_pushstring(L, ws_pool_tag(ws_lua_check_pool(L, 1)));
    return 1;
}

static int p_device(lua_State *L)
{
    ws_lua_push_device(L, ws_pool_device(ws_lua_check_pool(L, 1)));
    return 1;
}

static int p_free(lua_State *L)
{
    lpool *lp = check_lpool(L, 1);
    if (!lp->p) return 0;
    if (ws_pool_destroy(lp->p) != WS_OK) return ws_lua_raise(L, "free");
    lp->p = NULL;
    return 0;
}

/* __close: as free(), but with an error in flight a pool that still has live
 * tensors is left to the GC (they keep it alive; it goes after them) rather
 * than replacing the original error with this one. */
static int p_close(lua_State *L)
{
    lpool *lp = check_lpool(L, 1);
    if (lp->p && !lua_isnil(L, 2)) {
        if (ws_pool_destroy(lp->p) == WS_OK) lp->p = NULL;
        return 0;
    }
    return p_free(L);
}

static int p_gc(lua_State *L)
{
    lpool *lp = check_lpool(L, 1);
    /* Live tensors hold the pool's userdata, so destroy fails only when a
     * tensor outlives lua_close's ordering; then the memory goes with the
     * process rather than under a live tensor. */
    if (lp->p && ws_pool_destroy(lp->p) == WS_OK) lp->p = NULL;
    return 0;
}

static int p_tostring(lua_State *L)
{
    lpool *lp = check_lpool(L, 1);
    if (!lp->p) {
        lua_pushfstring(L, "ws.Pool('%s' freed)", lp->tag);
        return 1;
    }
    ws_pool_stats st;
    ws_pool_get_stats(lp->p, &st);
    char cap[32];
    snprintf(cap, sizeof cap, "%.1f MiB", (double)st.capacity / (1024.0 * 1024.0));
    lua_pushfstring(L, "ws.Pool('%s' %s %s %s)", ws_pool_tag(lp->p), ws_pool_device(lp->p)->name,
                    cap, st.asleep ? "asleep" : "awake");
    return 1;
}

static const luaL_Reg p_methods[] = {
    {"tensor", p_tensor},
    {"sleep", p_sleep},
    {"wake", p_wake},
    {"stats", p_stats},
    {"tag", p_tag},
    {"device", p_device},
    {"free", p_free},
    {NULL, NULL},
};

static const luaL_Reg p_meta[] = {
    {"__gc", p_gc},
    {"__close", p_close},
    {"__tostring", p_tostring},
    {NULL, NULL},
};

void ws_open_pool(lua_State *L)
{
    /* [ws] */
    ws_lua_new_type(L, WS_POOL_MT, p_methods, p_meta, NULL);
    lua_pushcfunction(L, l_pool);
    lua_setfield(L, -2, "pool");
    lua_pushcfunction(L, l_pool_bytes);
    lua_setfield(L, -2, "pool_bytes");
}
