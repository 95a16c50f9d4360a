/* bind_plan.c: the Lua face of sync plans (ws.plan, ws.Plan; plan.h).
 *
 * A plan is built once from lists of tensors and executed every step; the
 * per-tensor loops run in C. The userdata holds the core plan and a copy of
 * its name so a freed plan can still be named; user value 1 keeps the comm's
 * Lua object alive for as long as the plan may gather over it, user value 2
 * the pools of its tensors (the plan holds their storage, which lives in the
 * pool's memory, even after the tensors themselves are freed), user value 3
 * a relay's comm or, in server mode, the ws.Sender it packs into. */
#include <stdio.h>
#include <string.h>

#include "bind.h"
#include "plan.h"
#include "remote.h"

#define MAX_BUCKET_BYTES ((lua_Integer)1 << 62)

typedef struct ws_lplan {
    ws_plan *p; /* NULL: freed */
    int executing; /* inside execute (its progress callback may call back in) */
    char name[64];
    int world;
    int role; /* ws_plan_role: a relay's sender has no dsts, its receivers no srcs */
    size_t bucket_bytes;
    const char *device; /* device names live for the whole process */
} ws_lplan;

static ws_lplan *check_lplan(lua_State *L, int idx)
{
    return (ws_lplan *)luaL_checkudata(L, idx, WS_PLAN_MT);
}

static ws_plan *check_plan(lua_State *L, int idx)
{
    ws_lplan *lp = check_lplan(L, idx);
    if (!lp->p) {
        lua_pushfstring(L, "'%s'", lp->name);
        ws_lua_raise_freed(L, idx, "plan", lua_tostring(L, -1));
    }
    return lp->p;
}

static const char *const plan_options[] = {"bucket_mb", "bucket_bytes", "comm", "device", "name",
                                           "relay", "role", "gather_world", "sender", "exchange",
                                           "peers", NULL};

static size_t bucket_option(lua_State *L, int idx)
{
    int has_mb = lua_getfield(L, idx, "bucket_mb") != LUA_TNIL;          /* [mb] */
    int has_bytes = lua_getfield(L, idx, "bucket_bytes") != LUA_TNIL;    /* [mb, bytes] */
    size_t bytes = WS_PLAN_DEFAULT_BUCKET_BYTES;
    if (has_mb && has_bytes) luaL_error(L, "ws.plan: give bucket_mb or bucket_bytes, not both");
    if (has_bytes) {
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) <= 0)
            luaL_error(L, "ws.plan: bucket_bytes must be a positive integer, got %s",
                       luaL_tolstring(L, -1, NULL));
        /* Staging is sized from it: keep the engine's arithmetic in range. */
        if (lua_tointeger(L, -1) > MAX_BUCKET_BYTES)
            luaL_error(L, "ws.plan: bucket_bytes = %I is too large (at most 2^62)",
                       lua_tointeger(L, -1));
        bytes = (size_t)lua_tointeger(L, -1);
    } else if (has_mb) {
        if (lua_type(L, -2) != LUA_TNUMBER || !(lua_tonumber(L, -2) > 0))
            luaL_error(L, "ws.plan: bucket_mb must be a positive number, got %s",
                       luaL_tolstring(L, -2, NULL));
        double mb = lua_tonumber(L, -2);
        /* Checked before converting: a double past size_t does not convert. */
        if (!(mb <= (double)(MAX_BUCKET_BYTES >> 20)))
            luaL_error(L, "ws.plan: bucket_mb = %f is too large", mb);
        bytes = (size_t)(mb * (double)(1 << 20));
    }
    lua_pop(L, 2);
    return bytes;
}

/* ws.plan{bucket_mb=N | bucket_bytes=N, comm=c, device=dev, name="base"}
 * -> plan | nil, msg, code (device absent, out of memory) */
static int l_plan(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    ws_lua_check_options(L, 1, plan_options, "ws.plan");
    size_t bucket = bucket_option(L, 1);

    ws_comm *comm = NULL;
    lua_getfield(L, 1, "comm"); /* [comm] */
    int comm_idx = lua_gettop(L);
    if (!lua_isnil(L, comm_idx)) {
        /* An option, not an argument: name it rather than "bad argument #2". */
        if (!luaL_testudata(L, comm_idx, WS_COMM_MT))
            luaL_error(L, "ws.plan: comm must be a ws.Comm, got %s", luaL_typename(L, comm_idx));
        comm = ws_lua_comm_live(L, comm_idx);
        if (!comm)
            luaL_error(L, "ws.plan: option comm: %s",
                       ws_lua_push_freed(L, "comm", ws_lua_comm_name(L, comm_idx)));
    }

    ws_device *dev;
    if (lua_getfield(L, 1, "device") == LUA_TNIL) { /* [comm, device] */
        dev = ws_lua_default_device(L);
    } else {
        /* A malformed name raises; an absent device is the environment. */
        ws_status rc = ws_lua_to_device(L, -1, &dev);
        if (rc != WS_OK) return ws_lua_fail(L, rc, "ws.plan");
    }

    const char *name = "plan";
    if (lua_getfield(L, 1, "name") != LUA_TNIL) { /* [comm, device, name] */
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "ws.plan: name must be a string, got %s", luaL_typename(L, -1));
        name = lua_tostring(L, -1);
    }

    /* Released first, then acquired: a failure leaves a consistent object. */
    ws_lplan *lp = (ws_lplan *)lua_newuserdatauv(L, sizeof *lp, 4); /* [..., plan] */
    int plan_idx = lua_gettop(L);
    memset(lp, 0, sizeof *lp);
    luaL_setmetatable(L, WS_PLAN_MT);
    lua_pushvalue(L, comm_idx);
    lua_setiuservalue(L, -2, 1);
    lua_newtable(L);
    lua_setiuservalue(L, -2, 2);
    snprintf(lp->name, sizeof lp->name, "%s", name);

    ws_status rc = ws_plan_create(comm, dev, bucket, name, &lp->p);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "ws.plan");
    lp->world = comm ? ws_comm_size(comm) : 1;
    /* Disaggregated: role = "sender" (a trainer rank) or "receiver" (an engine
     * rank), relay = the broadcast comm (nil on trainer ranks but the first),
     * gather_world = the trainer ranks' count. [.., plan, role] */
    if (lua_getfield(L, 1, "role") != LUA_TNIL) {
        static const char *const roles[] = {"sender", "receiver", "remote", NULL};
        int role = luaL_checkoption(L, -1, NULL, roles);
        if (role == 2) { /* server mode: sender = the engine process's ws.Sender */
            if (lua_getfield(L, 1, "sender") == LUA_TNIL || !luaL_testudata(L, -1, "ws.Sender"))
                luaL_error(L, "ws.plan: role 'remote' needs sender = a ws.Sender, got %s",
                           luaL_typename(L, -1));
            ws_sender *s = ws_lua_sender_live(L, lua_gettop(L));
            if (!s) luaL_error(L, "ws.plan: option sender: the sender was closed");
            rc = ws_plan_set_remote(lp->p, s);
            if (rc != WS_OK) return ws_lua_raise(L, "ws.plan");
            lua_setiuservalue(L, plan_idx, 3); /* kept alive with the plan */
            lua_pop(L, 1);
            lp->role = WS_PLAN_REMOTE;
            lp->bucket_bytes = bucket;
            lp->device = dev->name;
            return 1;
        }
        ws_comm *relay = NULL;
        if (lua_getfield(L, 1, "relay") != LUA_TNIL) { /* [.., plan, role, relay] */
            if (!luaL_testudata(L, -1, WS_COMM_MT))
                luaL_error(L, "ws.plan: relay must be a ws.Comm, got %s", luaL_typename(L, -1));
            relay = ws_lua_comm_live(L, lua_gettop(L));
            if (!relay) luaL_error(L, "ws.plan: option relay: the comm was freed");
            lua_pushvalue(L, -1);
            lua_setiuservalue(L, plan_idx, 3); /* kept alive with the plan */
        }
        lua_pop(L, 1); /* [.., plan, role] */
        lua_getfield(L, 1, "gather_world");
        int gw = (int)luaL_optinteger(L, -1, lp->world);
        lua_pop(L, 2); /* [.., plan] */
        rc = ws_plan_set_relay(lp->p, role == 0 ? WS_PLAN_SENDER : WS_PLAN_RECEIVER, relay, gw);
        if (rc != WS_OK) return ws_lua_raise(L, "ws.plan");
        /* peers = a comm of every rank, trainer ranks first: each trainer
         * rank may then send its shard to the engine ranks itself. */
        if (lua_getfield(L, 1, "peers") != LUA_TNIL) { /* [.., plan, peers] */
            if (!luaL_testudata(L, -1, WS_COMM_MT))
                luaL_error(L, "ws.plan: peers must be a ws.Comm, got %s", luaL_typename(L, -1));
            ws_comm *all = ws_lua_comm_live(L, lua_gettop(L));
            if (!all) luaL_error(L, "ws.plan: option peers: the comm was freed");
            rc = ws_plan_set_peers(lp->p, all);
            if (rc != WS_OK) return ws_lua_raise(L, "ws.plan");
            lua_pushvalue(L, -1);
            lua_setiuservalue(L, plan_idx, 4); /* kept alive with the plan */
        }
        lua_pop(L, 1); /* [.., plan] */
        lp->world = gw;
        lp->role = role == 0 ? WS_PLAN_SENDER : WS_PLAN_RECEIVER;
    } else {
        lua_pop(L, 1);
        if (lua_getfield(L, 1, "peers") != LUA_TNIL)
            luaL_error(L, "ws.plan: peers is for a relay (role = \"sender\" or \"receiver\")");
        lua_pop(L, 1);
    }
    /* exchange = "auto" (the default: point-to-point messages straight
     * between shards and destinations where the comm can, else as
     * "staged"), "staged" (through staging buffers: an all_to_all of what
     * each rank's blocks need, when that moves fewer bytes) or "all_gather"
     * (whole tensors through staging, always). [.., plan] */
    if (lua_getfield(L, 1, "exchange") != LUA_TNIL) {
        static const char *const modes[] = {"auto", "all_gather", "staged", NULL};
        static const ws_plan_exchange how[] = {WS_PLAN_EXCHANGE_AUTO, WS_PLAN_EXCHANGE_GATHER,
                                               WS_PLAN_EXCHANGE_STAGED};
        int mode = luaL_checkoption(L, -1, NULL, modes);
        rc = ws_plan_set_exchange(lp->p, how[mode]);
        if (rc != WS_OK) return ws_lua_raise(L, "ws.plan");
    }
    lua_pop(L, 1);
    lp->bucket_bytes = bucket;
    lp->device = dev->name;
    return 1;
}

/* The engine iterates the plan's entries and buffers while it runs: a
 * progress callback must not change or free them under it. */
static void check_idle(lua_State *L, const char *what)
{
    ws_lplan *lp = check_lplan(L, 1);
    if (lp->executing)
        luaL_error(L, "%s: plan '%s' is executing (called from its progress callback); call it "
                      "after execute returns",
                   what, lp->name);
}

/* Keeps the pool of every tensor in the list at idx (user value 1 of a pool
 * tensor) in the plan's user value 2, as a set. */
static void keep_pools(lua_State *L, int idx)
{
    lua_getiuservalue(L, 1, 2); /* [.., pools] */
    size_t n = (size_t)lua_rawlen(L, idx);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i); /* [.., pools, t] */
        if (lua_getiuservalue(L, -1, 1) != LUA_TNIL) { /* [.., pools, t, pool] */
            lua_pushboolean(L, 1);
            lua_rawset(L, -4);
            lua_pop(L, 1);
        } else {
            lua_pop(L, 2);
        }
    }
    lua_pop(L, 1);
}

/* Reads the optional list at idx of n integers into a new userdata (left
 * on the stack); nil: `fill(i)` for each. */
static int64_t *int_list(lua_State *L, int idx, size_t n, const char *what, ws_tensor **dsts)
{
    int64_t *v = (int64_t *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *v, 0);
    if (lua_isnoneornil(L, idx)) {
        for (size_t i = 0; i < n; i++) v[i] = dsts ? ws_tensor_numel(dsts[i]) : 0;
        return v;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    if ((size_t)lua_rawlen(L, idx) != n)
        luaL_error(L, "plan:add: %d %s for %d entries", (int)lua_rawlen(L, idx), what, (int)n);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int ok;
        lua_Integer x = lua_tointegerx(L, -1, &ok);
        if (!ok)
            luaL_error(L, "plan:add: %s[%d] must be an integer, got %s", what, (int)i + 1,
                       luaL_typename(L, -1));
        v[i] = (int64_t)x;
        lua_pop(L, 1);
    }
    return v;
}

/* Reads the optional list of destination blocks at idx (per entry false, or
 * {cols, row_begin, row_end, col_begin, col_end}, 0-based, half open) into a
 * new userdata left on the stack; NULL when idx is nil. */
static ws_plan_block *block_list(lua_State *L, int idx, size_t n)
{
    if (lua_isnoneornil(L, idx)) return NULL;
    luaL_checktype(L, idx, LUA_TTABLE);
    if ((size_t)lua_rawlen(L, idx) != n)
        luaL_error(L, "plan:add: %d blocks for %d entries", (int)lua_rawlen(L, idx), (int)n);
    ws_plan_block *v = (ws_plan_block *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *v, 0);
    for (size_t i = 0; i < n; i++) {
        memset(&v[i], 0, sizeof v[i]);
        int t = lua_rawgeti(L, idx, (lua_Integer)i + 1); /* [.., b] */
        if (t == LUA_TTABLE) {
            int64_t f[5];
            for (int k = 0; k < 5; k++) {
                lua_rawgeti(L, -1, k + 1);
                int ok;
                lua_Integer x = lua_tointegerx(L, -1, &ok);
                if (!ok)
                    luaL_error(L, "plan:add: blocks[%d] must be {cols, row_begin, row_end, "
                                  "col_begin, col_end}, integers",
                               (int)i + 1);
                f[k] = (int64_t)x;
                lua_pop(L, 1);
            }
            v[i] = (ws_plan_block){f[0], f[1], f[2], f[3], f[4]};
        } else if (t != LUA_TNIL && !(t == LUA_TBOOLEAN && !lua_toboolean(L, -1))) {
            luaL_error(L, "plan:add: blocks[%d] must be a table or false, got %s", (int)i + 1,
                       luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
    return v;
}

/* plan:add(srcs, dsts [, numels [, shards [, blocks [, wire]]]]) -> plan.
 * shards: elements of every rank's shard per entry (0 or nil: ceil(numel /
 * world)); blocks: per entry false (the whole tensor) or {cols, row_begin,
 * row_end, col_begin, col_end} (0-based, half open; plan.h). A relay's
 * sender passes nil dsts and wire (dtype names per entry), its receivers
 * nil srcs; both then give numels. */
static int l_add(lua_State *L)
{
    ws_plan *p = check_plan(L, 1);
    check_idle(L, "plan:add");
    int role = check_lplan(L, 1)->role;
    lua_settop(L, 7); /* [plan, srcs, dsts, numels, shards, blocks, wire]: keepers go above */
    /* Only a relay leaves a side out; elsewhere nil is a wrong argument. */
    int has_src = !lua_isnil(L, 2) || role != WS_PLAN_RECEIVER;
    int has_dst = !lua_isnil(L, 3) || (role != WS_PLAN_SENDER && role != WS_PLAN_REMOTE);
    if ((!has_src || !has_dst) && lua_isnil(L, 4))
        return luaL_error(L, "plan:add: without %s, give the numels",
                          has_src ? "destinations" : "sources");
    size_t ns = 0, nd = 0;
    ws_tensor **srcs = NULL, **dsts = NULL;
    if (has_src) srcs = ws_lua_check_tensor_list(L, 2, &ns); /* [..., srcs_keep] */
    if (has_dst) dsts = ws_lua_check_tensor_list(L, 3, &nd); /* [..., dsts_keep] */
    if (!has_src) ns = nd;
    if (!has_dst) nd = ns;
    if (ns != nd)
        return luaL_error(L, "plan:add: %d sources but %d destinations; the lists pair up "
                             "one to one",
                          (int)ns, (int)nd);
    int64_t *numel = int_list(L, 4, ns, "numels", dsts);
    int64_t *shard = int_list(L, 5, ns, "shards", NULL);
    ws_plan_block *blocks = block_list(L, 6, ns);
    ws_dtype *wire = NULL;
    if (!lua_isnil(L, 7)) {
        luaL_checktype(L, 7, LUA_TTABLE);
        if ((size_t)lua_rawlen(L, 7) != ns)
            return luaL_error(L, "plan:add: %d wire dtypes for %d entries", (int)lua_rawlen(L, 7),
                              (int)ns);
        wire = (ws_dtype *)lua_newuserdatauv(L, (ns ? ns : 1) * sizeof *wire, 0);
        for (size_t i = 0; i < ns; i++) {
            lua_rawgeti(L, 7, (lua_Integer)i + 1);
            wire[i] = ws_lua_check_dtype(L, lua_gettop(L), "plan:add wire");
            lua_pop(L, 1);
        }
    }
    ws_status rc = ws_plan_add_blocks(p, (const ws_tensor *const *)srcs,
                                      (const ws_tensor *const *)dsts, numel, shard, blocks, wire,
                                      ns);
    if (rc != WS_OK) return ws_lua_raise(L, NULL);
    if (has_src) keep_pools(L, 2);
    if (has_dst) keep_pools(L, 3);
    lua_settop(L, 1);
    return 1;
}

static void push_stats(lua_State *L, const ws_plan_stats *s)
{
    ws_lua_int_field fields[] = {{"entries", (lua_Integer)s->entries},
                                 {"buckets", (lua_Integer)s->buckets},
                                 {"bytes_moved", (lua_Integer)s->bytes_moved},
                                 {"bytes_gathered", (lua_Integer)s->bytes_gathered},
                                 {"staging_bytes", (lua_Integer)s->staging_bytes},
                                 {"bytes_relayed", (lua_Integer)s->bytes_relayed},
                                 {"bytes_gathered_full", (lua_Integer)s->bytes_gathered_full}};
    ws_lua_push_int_fields(L, fields, 7, 5);
    lua_pushnumber(L, s->pack_ms);
    lua_setfield(L, -2, "pack_ms");
    lua_pushnumber(L, s->gather_ms);
    lua_setfield(L, -2, "gather_ms");
    lua_pushnumber(L, s->copy_out_ms);
    lua_setfield(L, -2, "copy_out_ms");
    lua_pushnumber(L, s->total_ms);
    lua_setfield(L, -2, "total_ms");
    lua_pushboolean(L, s->exchanged);
    lua_setfield(L, -2, "exchanged");
    lua_pushboolean(L, s->direct);
    lua_setfield(L, -2, "direct");
}

typedef struct progress_ctx {
    lua_State *L;
    int failed; /* the callback raised; its error object is on top of the stack */
} progress_ctx;

/* Runs the Lua callback in protected mode: a Lua error must not unwind
 * through the engine while a gather is in flight. */
static int call_progress(void *ctx, size_t bucket, size_t buckets, size_t done, size_t total)
{
    progress_ctx *pc = (progress_ctx *)ctx;
    lua_State *L = pc->L;
    lua_pushvalue(L, 2); /* [fn] */
    lua_pushinteger(L, (lua_Integer)bucket);
    lua_pushinteger(L, (lua_Integer)buckets);
    lua_pushinteger(L, (lua_Integer)done);
    lua_pushinteger(L, (lua_Integer)total);
    if (lua_pcall(L, 4, 1, 0) != LUA_OK) { /* [err] */
        pc->failed = 1;
        return 1;
    }
    /* [result]: only an explicit false stops; nil (no return) continues. */
    int stop = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
    lua_pop(L, 1);
    return stop;
}

/* plan:execute([progress_fn]) -> stats */
static int l_execute(lua_State *L)
{
    ws_plan *p = check_plan(L, 1);
    check_idle(L, "plan:execute");
    ws_lplan *lp = check_lplan(L, 1);
    int has_fn = !lua_isnoneornil(L, 2);
    if (has_fn) luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    luaL_checkstack(L, 8, "plan:execute");
    /* [plan, fn, comm]: the comm must still be open, and stays so until the
     * engine is done (comm:free() in the callback raises). */
    int has_comm = lua_getiuservalue(L, 1, 1) != LUA_TNIL;
    if (has_comm && !ws_lua_comm_live(L, 3))
        return luaL_error(L, "plan:execute: plan '%s': its comm %s was freed; keep the comm "
                             "open while the plan lives",
                          lp->name, ws_lua_comm_name(L, 3));
    lua_settop(L, 3);
    int has_relay = lua_getiuservalue(L, 1, 3) != LUA_TNIL; /* [plan, fn, comm, relay] */
    int remote = lp->role == WS_PLAN_REMOTE;
    if (remote) has_relay = 0;
    if (has_relay && !ws_lua_comm_live(L, 4))
        return luaL_error(L, "plan:execute: plan '%s': its relay comm was freed; keep it open "
                             "while the plan lives",
                          lp->name);
    if (remote && !ws_lua_sender_live(L, 4))
        return luaL_error(L, "plan:execute: plan '%s': its sender was closed; keep it open "
                             "while the plan lives",
                          lp->name);
    lua_settop(L, 4);
    int has_peers = lua_getiuservalue(L, 1, 4) != LUA_TNIL; /* [plan, fn, comm, relay, peers] */
    if (has_peers && !ws_lua_comm_live(L, 5))
        return luaL_error(L, "plan:execute: plan '%s': its peers' comm was freed; keep it open "
                             "while the plan lives",
                          lp->name);
    if (has_comm) ws_lua_comm_hold(L, 3, 1);
    if (has_relay) ws_lua_comm_hold(L, 4, 1);
    if (has_peers) ws_lua_comm_hold(L, 5, 1);
    if (remote) ws_lua_sender_hold(L, 4, 1);
    lp->executing = 1;
    progress_ctx pc = {L, 0};
    ws_status rc = ws_plan_execute(p, has_fn ? call_progress : NULL, &pc);
    lp->executing = 0;
    if (has_comm) ws_lua_comm_hold(L, 3, -1);
    if (has_relay) ws_lua_comm_hold(L, 4, -1);
    if (has_peers) ws_lua_comm_hold(L, 5, -1);
    if (remote) ws_lua_sender_hold(L, 4, -1);
    if (pc.failed) return lua_error(L); /* the callback's own error */
    if (rc != WS_OK) return ws_lua_raise(L, NULL);
    ws_plan_stats s;
    ws_plan_get_stats(p, &s);
    push_stats(L, &s);
    return 1;
}

/* plan:targets(tensors, offsets): server mode, per entry the 0-based index
 * of its engine tensor in the sync's manifest and the element where it
 * starts there (plan.h, ws_plan_set_targets). */
static int l_targets(lua_State *L)
{
    ws_plan *p = check_plan(L, 1);
    check_idle(L, "plan:targets");
    luaL_checktype(L, 2, LUA_TTABLE);
    size_t n = (size_t)lua_rawlen(L, 2);
    int64_t *idx = int_list(L, 2, n, "tensors", NULL);
    int64_t *off = int_list(L, 3, n, "offsets", NULL);
    uint32_t *t = (uint32_t *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *t, 0);
    for (size_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] > (int64_t)UINT32_MAX)
            return luaL_error(L, "plan:targets: tensors[%d] = %d is not a manifest index",
                              (int)i + 1, (int)idx[i]);
        t[i] = (uint32_t)idx[i];
    }
    if (ws_plan_set_targets(p, t, off, n) != WS_OK) return ws_lua_raise(L, NULL);
    lua_settop(L, 1);
    return 1;
}

static int l_stats(lua_State *L)
{
    ws_plan_stats s;
    ws_plan_get_stats(check_plan(L, 1), &s);
    push_stats(L, &s);
    return 1;
}

/* plan:estimate() -> the stats an execution would report, from the layout
 * alone (no memory touched, no staging allocated). */
static int l_estimate(lua_State *L)
{
    ws_plan_stats s;
    ws_status rc = ws_plan_estimate(check_plan(L, 1), &s);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "plan:estimate");
    push_stats(L, &s);
    return 1;
}

/* free(), __gc and __close: idempotent. */
static int l_free(lua_State *L)
{
    ws_lplan *lp = check_lplan(L, 1);
    check_idle(L, "plan:free");
    ws_plan *p = lp->p;
    lp->p = NULL;
    ws_plan_destroy(p);
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 1);
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 2);
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 3);
    return 0;
}

static int l_tostring(lua_State *L)
{
    ws_lplan *lp = check_lplan(L, 1);
    if (!lp->p) {
        lua_pushfstring(L, "ws.Plan('%s' freed)", lp->name);
        return 1;
    }
    ws_plan_stats s;
    ws_plan_get_stats(lp->p, &s);
    lua_pushfstring(L, "ws.Plan('%s' %d entries, bucket %d KiB, world %d, %s)", lp->name,
                    (int)s.entries, (int)(lp->bucket_bytes >> 10), lp->world, lp->device);
    return 1;
}

static const luaL_Reg plan_methods[] = {
    {"add", l_add},   {"execute", l_execute}, {"stats", l_stats}, {"targets", l_targets},
    {"estimate", l_estimate}, {"free", l_free}, {NULL, NULL},
};

static const luaL_Reg plan_meta[] = {
    {"__gc", l_free},
    {"__close", l_free},
    {"__tostring", l_tostring},
    {NULL, NULL},
};

void ws_open_plan(lua_State *L)
{
    /* [ws] */
    ws_lua_new_type(L, WS_PLAN_MT, plan_methods, plan_meta, NULL);
    lua_pushcfunction(L, l_plan);
    lua_setfield(L, -2, "plan");
}
