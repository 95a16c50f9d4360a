/* bind_sender.c: the Lua face of server mode's trainer side (ws.sender,
 * ws.Sender, ws.Proofs; remote.h).
 *
 * A sender is the connection to an engine process (its wshost.Receiver).
 * The runner (lua/ws/remote.lua) begins each sync with the plan's manifest,
 * lets the plan pack its buckets into the sender's slots (ws.plan{role =
 * "remote", sender = s}) and finishes with proofs: per range of an engine
 * tensor, the checksum the trainer's weights give it. A ws.Proofs holds the
 * ranges once (names and offsets in C arrays); each sync hands it the
 * checksums as one i64 tensor, so no per-tensor loop runs in Lua. While a
 * plan uses the sender (`busy`), close() refuses. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bind.h"
#include "remote.h"

#define WS_SENDER_MT "ws.Sender"
#define WS_PROOFS_MT "ws.Proofs"

typedef struct lsender {
    ws_sender *s; /* NULL: closed */
    int busy;     /* plans that send through it */
    lua_State *L; /* the state whose interrupts stop a wait */
    char name[104];
} lsender;

typedef struct lproofs {
    ws_proof *p;
    size_t n;
    char *names; /* every tensor and label string, NUL-terminated */
} lproofs;

/* What the engine process or the connection says: its message as it is,
 * with no Lua position in front (it is not the caller's misuse). */
static int raise_remote(lua_State *L)
{
    lua_pushstring(L, ws_errmsg());
    return lua_error(L);
}

static lsender *check_lsender(lua_State *L, int idx)
{
    return (lsender *)luaL_checkudata(L, idx, WS_SENDER_MT);
}

static ws_sender *check_sender(lua_State *L, int idx)
{
    lsender *ls = check_lsender(L, idx);
    if (!ls->s) {
        lua_pushfstring(L, "'%s'", ls->name);
        ws_lua_raise_freed(L, idx, "sender", lua_tostring(L, -1));
    }
    return ls->s;
}

ws_sender *ws_lua_sender_live(lua_State *L, int idx)
{
    return check_lsender(L, idx)->s;
}

void ws_lua_sender_hold(lua_State *L, int idx, int delta) { check_lsender(L, idx)->busy += delta; }

/* Ctrl-C: the wshost binary's handler, or an embedding program's interrupt
 * (host/api), or lua.c's: each sets a hook on every call, return and line
 * with a count of 1 that raises "interrupted!". Any other hook (a profiler's
 * count hook, a coverage tool's line hook, a debugger) is not an interrupt. */
static int interrupted(void *ctx)
{
    lsender *ls = ctx;
    if (ws_lua_is_interrupted()) return 1;
    if (!ls->L || lua_gethook(ls->L) == NULL) return 0;
    return lua_gethookmask(ls->L) == (LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT) &&
           lua_gethookcount(ls->L) == 1;
}

static int int_field(lua_State *L, int idx, const char *key, lua_Integer dflt, lua_Integer lo,
                     lua_Integer hi)
{
    lua_Integer v = dflt;
    if (lua_getfield(L, idx, key) != LUA_TNIL) {
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < lo || lua_tointeger(L, -1) > hi)
            luaL_error(L, "ws.sender: %s must be an integer in [%I, %I], got %s", key, lo, hi,
                       luaL_tolstring(L, -1, NULL));
        v = lua_tointeger(L, -1);
    }
    lua_pop(L, 1);
    return (int)v;
}

static const char *const sender_options[] = {"slot_bytes", "timeout_ms", "connect_timeout_ms",
                                             "slot_device", NULL};

/* ws.sender(name [, {slot_bytes=, timeout_ms=, connect_timeout_ms=, slot_device=}])
 * -> sender | nil, msg, code (no engine process listening, it died, ...)
 * slot_device: a ws.Device or name; a GPU puts the slots in its memory,
 * shared through CUDA IPC (for an engine whose tensors are on a GPU). */
static int l_sender(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    ws_sender_opts o = {0};
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        ws_lua_check_options(L, 2, sender_options, "ws.sender");
        if (lua_getfield(L, 2, "slot_bytes") != LUA_TNIL) {
            if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) <= 0 ||
                lua_tointeger(L, -1) > ((lua_Integer)1 << 40))
                luaL_error(L, "ws.sender: slot_bytes must be a positive integer up to 2^40, "
                              "got %s",
                           luaL_tolstring(L, -1, NULL));
            o.slot_bytes = (size_t)lua_tointeger(L, -1);
        }
        lua_pop(L, 1);
        o.timeout_ms = int_field(L, 2, "timeout_ms", 0, 1, INT32_MAX);
        if (lua_getfield(L, 2, "slot_device") != LUA_TNIL) {
            ws_status drc = ws_lua_to_device(L, lua_gettop(L), &o.slot_device);
            if (drc != WS_OK) return ws_lua_fail(L, drc, "ws.sender");
        }
        lua_pop(L, 1);
        o.connect_timeout_ms = int_field(L, 2, "connect_timeout_ms", 0, 1, INT32_MAX);
    }
    lsender *ls = (lsender *)lua_newuserdatauv(L, sizeof *ls, 0);
    memset(ls, 0, sizeof *ls);
    luaL_setmetatable(L, WS_SENDER_MT);
    snprintf(ls->name, sizeof ls->name, "%s", name);
    /* The main thread: the one an embedding program's interrupt hooks, and
     * one that outlives any coroutine this call may run in. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    ls->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    o.interrupted = interrupted;
    o.ctx = ls;
    ws_status rc = ws_sender_connect(name, &o, &ls->s);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "ws.sender");
    return 1;
}

/* sender:begin(manifest, weight_version [, partial [, unproven [, direct]]])
 * manifest: list of {name=, dtype=, shape={...}} (the engine's tensors this
 * sync writes, whole); partial: not every tensor of the engine; unproven:
 * the sync finishes without proofs (verify=off), so the engine process does
 * not checksum what lands; direct: the tensors were written in place, in
 * memory the engine process shares. Raises the receiver's refusal (it names
 * the tensor). */
static int l_begin(lua_State *L)
{
    ws_sender *s = check_sender(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer version = luaL_checkinteger(L, 3);
    luaL_argcheck(L, version >= 0, 3, "the weight version must not be negative");
    unsigned flags = (lua_toboolean(L, 4) ? WS_MANIFEST_PARTIAL : 0u) |
                     (lua_toboolean(L, 5) ? WS_MANIFEST_UNPROVEN : 0u) |
                     (lua_toboolean(L, 6) ? WS_MANIFEST_DIRECT : 0u);
    size_t n = (size_t)lua_rawlen(L, 2);
    ws_wire_tensor *ts = lua_newuserdatauv(L, (n ? n : 1) * sizeof *ts, 0); /* freed by the GC */
    /* The names, kept alive until the manifest is sent: an entry's __index
     * may hand out a string nothing else holds. */
    lua_createtable(L, (int)(n < INT32_MAX ? n : 0), 0);
    int names = lua_gettop(L);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 2, (lua_Integer)i + 1); /* [.., entry] */
        if (!lua_istable(L, -1))
            luaL_error(L, "sender:begin: manifest entry %d is not a table", (int)i + 1);
        lua_getfield(L, -1, "name");
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "sender:begin: manifest entry %d has no name", (int)i + 1);
        ts[i].name = lua_tostring(L, -1);
        lua_rawseti(L, names, (lua_Integer)i + 1);
        lua_getfield(L, -1, "dtype");
        ts[i].dtype = ws_lua_check_dtype(L, -1, "sender:begin");
        lua_pop(L, 1);
        lua_getfield(L, -1, "shape");
        int infer; /* written by ws_lua_read_shape even when it infers nothing */
        ts[i].ndim = ws_lua_read_shape(L, lua_gettop(L), "sender:begin", ts[i].shape, 0, &infer);
        lua_pop(L, 2);
    }
    if (ws_sender_begin(s, ts, n, (uint64_t)version, flags) != WS_OK)
        return raise_remote(L);
    return 0;
}

static void free_proofs(lproofs *lp)
{
    free(lp->p);
    free(lp->names);
    lp->p = NULL;
    lp->names = NULL;
    lp->n = 0;
}

static int l_proofs_gc(lua_State *L)
{
    free_proofs((lproofs *)luaL_checkudata(L, 1, WS_PROOFS_MT));
    return 0;
}

/* ws.proofs(list) -> ws.Proofs; list of {tensor=, label=, offset=, count=}:
 * elements [offset, offset + count) of engine tensor `tensor`, which came
 * from `label` (a trainer parameter). */
static int l_proofs(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    size_t n = (size_t)lua_rawlen(L, 1), bytes = 0;
    lproofs *lp = (lproofs *)lua_newuserdatauv(L, sizeof *lp, 0);
    memset(lp, 0, sizeof *lp);
    luaL_setmetatable(L, WS_PROOFS_MT);
    int top = lua_gettop(L);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 1, (lua_Integer)i + 1);
        if (!lua_istable(L, -1)) luaL_error(L, "ws.proofs: entry %d is not a table", (int)i + 1);
        for (int f = 0; f < 2; f++) {
            lua_getfield(L, -1, f ? "label" : "tensor");
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "ws.proofs: entry %d: %s must be a string", (int)i + 1,
                           f ? "label" : "tensor");
            bytes += lua_rawlen(L, -1) + 1;
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lp->p = calloc(n ? n : 1, sizeof *lp->p);
    lp->names = malloc(bytes ? bytes : 1);
    if (!lp->p || !lp->names) {
        free_proofs(lp);
        return luaL_error(L, "ws.proofs: out of host memory");
    }
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 1, (lua_Integer)i + 1);
        const char *str[2];
        for (int f = 0; f < 2; f++) {
            lua_getfield(L, -1, f ? "label" : "tensor");
            size_t len = 0;
            /* An __index may answer differently from the first pass: the
             * sizes counted then are the room there is. */
            const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
            if (!v || len + 1 > bytes - used)
                luaL_error(L, "ws.proofs: entry %d: %s changed while it was read", (int)i + 1,
                           f ? "label" : "tensor");
            memcpy(lp->names + used, v, len + 1);
            str[f] = lp->names + used;
            used += len + 1;
            lua_pop(L, 1);
        }
        lua_Integer v[2];
        for (int f = 0; f < 2; f++) {
            lua_getfield(L, -1, f ? "count" : "offset");
            if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 0)
                luaL_error(L, "ws.proofs: entry %d: %s must be a non-negative integer", (int)i + 1,
                           f ? "count" : "offset");
            v[f] = lua_tointeger(L, -1);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
        lp->p[i] = (ws_proof){str[0], str[1], (uint64_t)v[0], (uint64_t)v[1], 0};
    }
    lp->n = n;
    lua_settop(L, top);
    return 1;
}

/* The proofs at idx with the checksums of the i64 tensor at idx + 1 (one per
 * proof) filled in. */
static lproofs *proofs_with_sums(lua_State *L, int idx, const char *what)
{
    lproofs *lp = (lproofs *)luaL_checkudata(L, idx, WS_PROOFS_MT);
    ws_tensor *sums = ws_lua_check_tensor(L, idx + 1);
    if (sums->dtype != WS_I64 || ws_tensor_numel(sums) != (int64_t)lp->n ||
        !ws_tensor_is_contiguous(sums) || ws_tensor_device(sums)->kind != WS_DEVICE_CPU)
        luaL_error(L, "%s: the checksums must be a contiguous cpu i64 tensor of %d elements (one "
                      "per proof)",
                   what, (int)lp->n);
    void *ptr;
    if (ws_tensor_access(sums, WS_ACCESS_READ, "checksums", &ptr) != WS_OK)
        ws_lua_raise(L, what);
    const uint64_t *v = ptr;
    for (size_t i = 0; i < lp->n; i++) lp->p[i].checksum = v[i];
    return lp;
}

/* sender:finish([proofs, sums]): waits for every acknowledgement, hands the
 * proofs over and waits for the engine's verdict (raised, naming the tensor).
 * No proofs: the engine takes the sync once every element arrived
 * (verify=off). */
static int l_finish(lua_State *L)
{
    ws_sender *s = check_sender(L, 1);
    ws_status rc;
    if (lua_isnoneornil(L, 2)) {
        rc = ws_sender_finish_proven(s, NULL, 0);
    } else {
        lproofs *lp = proofs_with_sums(L, 2, "sender:finish");
        rc = ws_sender_finish_proven(s, lp->p, lp->n);
    }
    if (rc != WS_OK) return raise_remote(L);
    return 0;
}

/* sender:verify(proofs [, sums]): outside a sync, the engine proves it holds
 * the ranges (sums given) or only that their tensors are valid (no sums). */
static int l_verify(lua_State *L)
{
    ws_sender *s = check_sender(L, 1);
    lproofs *lp;
    unsigned flags = 0;
    if (lua_isnoneornil(L, 3)) {
        lp = (lproofs *)luaL_checkudata(L, 2, WS_PROOFS_MT);
        flags = WS_VERIFY_VALIDITY;
    } else {
        lp = proofs_with_sums(L, 2, "sender:verify");
    }
    if (ws_sender_verify(s, lp->p, lp->n, flags) != WS_OK) return raise_remote(L);
    return 0;
}

static int l_wake(lua_State *L)
{
    ws_sender *s = check_sender(L, 1);
    if (ws_sender_wake(s, luaL_checkstring(L, 2)) != WS_OK) return raise_remote(L);
    return 0;
}

static int l_sleep(lua_State *L)
{
    ws_sender *s = check_sender(L, 1);
    lua_Integer level = luaL_checkinteger(L, 2);
    if (level != 1 && level != 2) return luaL_error(L, "sender:sleep: level must be 1 or 2");
    if (ws_sender_sleep(s, (int)level) != WS_OK) return raise_remote(L);
    return 0;
}

/* sender:shared(name, dtype, shape) -> ws.Tensor | nil: the engine
 * process's tensor `name` when it lives in memory that process shares
 * (wshost.Receiver.alloc), mapped here to be written in place. */
static int l_shared(lua_State *L)
{
    ws_sender *s = check_sender(L, 1);
    const char *name = luaL_checkstring(L, 2);
    ws_dtype dtype = ws_lua_check_dtype(L, 3, "sender:shared");
    int64_t shape[WS_MAX_DIMS];
    int infer;
    int ndim = ws_lua_read_shape(L, 4, "sender:shared", shape, 0, &infer);
    ws_ltensor *lt = ws_lua_new_tensor(L);
    if (ws_sender_shared(s, name, dtype, ndim, shape, &lt->t) != WS_OK) {
        if (ws_errcode() == WS_ERR_ARG && strstr(ws_errmsg(), "shares no tensor")) {
            lua_pushnil(L);
            return 1;
        }
        return raise_remote(L);
    }
    return 1;
}

static int l_shared_count(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)ws_sender_shared_count(check_sender(L, 1)));
    return 1;
}

static int l_peer_pid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)ws_sender_peer_pid(check_sender(L, 1)));
    return 1;
}

static int l_slot_bytes(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)ws_sender_slot_bytes(check_sender(L, 1)));
    return 1;
}

static int l_stats(lua_State *L)
{
    ws_sender_stats st = ws_sender_get_stats(check_sender(L, 1));
    ws_lua_int_field f[] = {{"buckets", (lua_Integer)st.buckets}, {"bytes", (lua_Integer)st.bytes}};
    ws_lua_push_int_fields(L, f, 2, 2);
    lua_pushnumber(L, st.pack_ms);
    lua_setfield(L, -2, "pack_ms");
    lua_pushnumber(L, st.wait_ms);
    lua_setfield(L, -2, "wait_ms");
    return 1;
}

/* close(), __gc and __close: idempotent; refused while a plan holds it. */
static int l_close(lua_State *L)
{
    lsender *ls = check_lsender(L, 1);
    if (ls->busy > 0 && lua_toboolean(L, lua_upvalueindex(1)) == 0)
        return luaL_error(L, "sender:close: sender '%s' is in use by %d plan(s); free them first",
                          ls->name, ls->busy);
    ws_sender *s = ls->s;
    ls->s = NULL;
    ws_sender_close(s);
    return 0;
}

static int l_tostring(lua_State *L)
{
    lsender *ls = check_lsender(L, 1);
    if (!ls->s)
        lua_pushfstring(L, "ws.Sender('%s' closed)", ls->name);
    else
        lua_pushfstring(L, "ws.Sender('%s' to pid %d)", ls->name, (int)ws_sender_peer_pid(ls->s));
    return 1;
}

static const luaL_Reg sender_methods[] = {
    {"begin", l_begin},       {"finish", l_finish},     {"verify", l_verify},
    {"wake", l_wake},         {"sleep", l_sleep},       {"peer_pid", l_peer_pid},
    {"slot_bytes", l_slot_bytes}, {"stats", l_stats},   {"shared", l_shared},
    {"shared_count", l_shared_count}, {NULL, NULL},
};

static const luaL_Reg no_functions[] = {{NULL, NULL}};
static const luaL_Reg proofs_meta[] = {{"__gc", l_proofs_gc}, {NULL, NULL}};

void ws_open_sender(lua_State *L)
{
    /* [ws] */
    ws_lua_new_type(L, WS_SENDER_MT, sender_methods, no_functions, NULL);
    /* close refuses while busy; __gc (the plan that held it is gone too) does not. */
    luaL_getmetatable(L, WS_SENDER_MT); /* [ws, mt] */
    lua_getfield(L, -1, "__index");     /* [ws, mt, methods] */
    lua_pushboolean(L, 0);
    lua_pushcclosure(L, l_close, 1);
    lua_setfield(L, -2, "close");
    lua_pop(L, 1);
    lua_pushboolean(L, 1);
    lua_pushcclosure(L, l_close, 1);
    lua_setfield(L, -2, "__gc");
    lua_pushboolean(L, 0);
    lua_pushcclosure(L, l_close, 1);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
    ws_lua_new_type(L, WS_PROOFS_MT, no_functions, proofs_meta, NULL);
    lua_pushcfunction(L, l_sender);
    lua_setfield(L, -2, "sender");
    lua_pushcfunction(L, l_proofs);
    lua_setfield(L, -2, "proofs");
}
