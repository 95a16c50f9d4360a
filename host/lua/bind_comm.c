/* bind_comm.c: the Lua face of communicators (ws.comm, ws.Comm, ws.Request).
 *
 * ws.comm() returns the world; comm:split makes sub-communicators, freed by
 * __gc / __close / :free(). Every collective raises on failure (a rank that
 * carried on after a failed collective would desynchronize the job; main()
 * then ends every rank). Ranks, roots and peers are 0-based, as in MPI.
 * Async forms return a ws.Request whose user value keeps the tensors alive
 * until :wait(); a request collected without a wait is completed by __gc so
 * no transfer ever writes into freed memory. */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "bind.h"

/* busy: pending requests and executing plans that use this communicator;
 * comm:free() refuses while it is not 0 (they would use a freed comm). */
typedef struct lcomm {
    ws_comm *c;
    int busy;
    char name[48]; /* "world", "color 1 of world": names it once freed */
} lcomm;
/* owner: the comm's userdata, kept alive by the request's user value. */
typedef struct lrequest { ws_comm_request *req; lcomm *owner; } lrequest;

ws_comm *ws_lua_check_comm(lua_State *L, int idx)
{
    lcomm *lc = (lcomm *)luaL_checkudata(L, idx, WS_COMM_MT);
    if (!lc->c) ws_lua_raise_freed(L, idx, "comm", ws_lua_comm_name(L, idx));
    return lc->c;
}

const char *ws_lua_comm_name(lua_State *L, int idx)
{
    lcomm *lc = (lcomm *)luaL_checkudata(L, idx, WS_COMM_MT);
    return lua_pushfstring(L, "'%s'", lc->name);
}

/* The core comm of the ws.Comm at idx, NULL once it was freed. */
ws_comm *ws_lua_comm_live(lua_State *L, int idx)
{
    lcomm *lc = (lcomm *)luaL_checkudata(L, idx, WS_COMM_MT);
    return lc->c;
}

void ws_lua_comm_hold(lua_State *L, int idx, int delta)
{
    ((lcomm *)luaL_checkudata(L, idx, WS_COMM_MT))->busy += delta;
}

/* Ranks, roots, peers, colors and keys are C ints: a larger Lua integer
 * must raise rather than wrap to another rank. */
static int check_int(lua_State *L, int idx, const char *what)
{
    lua_Integer v = luaL_checkinteger(L, idx);
    if (v < INT_MIN || v > INT_MAX)
        luaL_argerror(L, idx, lua_pushfstring(L, "%s %I out of range", what, v));
    return (int)v;
}

static lcomm *push_comm(lua_State *L, ws_comm *c, const char *name)
{
    lcomm *lc = (lcomm *)lua_newuserdatauv(L, sizeof *lc, 0);
    lc->c = c;
    lc->busy = 0;
    snprintf(lc->name, sizeof lc->name, "%s", name);
    luaL_setmetatable(L, WS_COMM_MT);
    return lc;
}

static int l_comm(lua_State *L)
{
    ws_comm *c;
    if (ws_comm_world(&c) != WS_OK) return ws_lua_raise(L, NULL);
    push_comm(L, c, "world");
    return 1;
}

static void release_comm(lcomm *lc)
{
    ws_comm *c = lc->c;
    lc->c = NULL;
    if (c) ws_comm_free(c); /* the world is never freed */
}

static int c_free(lua_State *L)
{
    lcomm *lc = (lcomm *)luaL_checkudata(L, 1, WS_COMM_MT);
    if (lc->c && lc->busy)
        return luaL_error(L, "comm:free: %d pending request(s) or executing plan(s) still use "
                             "this communicator; wait for them first",
                          lc->busy);
    release_comm(lc);
    return 0;
}

/* __close: as free(), but with an error in flight a busy comm is left to the
 * GC (its users keep it alive) so the original error is not replaced. */
static int c_close(lua_State *L)
{
    lcomm *lc = (lcomm *)luaL_checkudata(L, 1, WS_COMM_MT);
    if (lc->busy && !lua_isnil(L, 2)) return 0;
    return c_free(L);
}

/* __gc: nothing can use the comm any more (requests and plans hold it, and
 * are finalized first), so it always goes. */
static int c_gc(lua_State *L)
{
    release_comm((lcomm *)luaL_checkudata(L, 1, WS_COMM_MT));
    return 0;
}

static int c_tostring(lua_State *L)
{
    lcomm *lc = (lcomm *)luaL_checkudata(L, 1, WS_COMM_MT);
    if (!lc->c) {
        lua_pushfstring(L, "ws.Comm('%s' freed)", lc->name);
        return 1;
    }
    lua_pushfstring(L, "ws.Comm(rank %d of %d, %s)", ws_comm_rank(lc->c), ws_comm_size(lc->c),
                    ws_comm_backend(lc->c));
    return 1;
}

static int c_split(lua_State *L)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    int color = check_int(L, 2, "color");
    int key = lua_isnoneornil(L, 3) ? ws_comm_rank(c) : check_int(L, 3, "key");
    const char *name = lua_pushfstring(L, "color %d of %s", color,
                                       ((lcomm *)lua_touserdata(L, 1))->name);
    lcomm *lc = push_comm(L, NULL, name); /* [.., name, comm] released */
    ws_comm *out;
    if (ws_comm_split(c, color, key, &out) != WS_OK) return ws_lua_raise(L, NULL);
    if (!out) {
        lua_pushnil(L); /* color < 0: this rank is in no group */
        return 1;
    }
    lc->c = out;
    return 1;
}

/* ---- requests ---------------------------------------------------------------- */

/* Appends the value at idx to the keep table at `keep`, and for a tensor its
 * pool (its user value 1) too: a tensor freed before the wait drops its pool,
 * while the core still writes into the pool's memory. */
static void keep_value(lua_State *L, int keep, int idx)
{
    lua_pushvalue(L, idx);
    lua_rawseti(L, keep, (lua_Integer)lua_rawlen(L, keep) + 1);
    if (!luaL_testudata(L, idx, WS_TENSOR_MT)) return;
    if (lua_getiuservalue(L, idx, 1) == LUA_TNIL) { /* [.., pool] */
        lua_pop(L, 1);
        return;
    }
    lua_rawseti(L, keep, (lua_Integer)lua_rawlen(L, keep) + 1);
}

/* Pushes a released request that keeps arguments 1..top alive (the items of
 * list arguments too: the core holds pointers to those tensors until the
 * wait, and the caller may change its list); the caller fills ->req after
 * issuing the call. The comm at 1 counts the request as a user. */
static lrequest *new_request(lua_State *L)
{
    int top = lua_gettop(L);
    lrequest *r = (lrequest *)lua_newuserdatauv(L, sizeof *r, 1); /* [args.., req] */
    r->req = NULL;
    r->owner = NULL;
    luaL_setmetatable(L, WS_REQUEST_MT);
    lua_createtable(L, top, 0); /* [args.., req, keep] */
    int keep = lua_gettop(L);
    for (int i = 1; i <= top; i++) {
        keep_value(L, keep, i);
        if (lua_type(L, i) != LUA_TTABLE) continue;
        size_t n = (size_t)lua_rawlen(L, i);
        for (size_t k = 1; k <= n; k++) {
            lua_rawgeti(L, i, (lua_Integer)k); /* [.., keep, item] */
            keep_value(L, keep, keep + 1);
            lua_pop(L, 1);
        }
    }
    lua_setiuservalue(L, -2, 1); /* [args.., req] */
    return r;
}

/* Called once the request's call was issued: the comm now has a user. */
static void hold_owner(lua_State *L, lrequest *r)
{
    r->owner = (lcomm *)luaL_checkudata(L, 1, WS_COMM_MT);
    r->owner->busy++;
}

static void drop_owner(lrequest *r)
{
    if (r->owner) r->owner->busy--;
    r->owner = NULL;
}

static int r_wait(lua_State *L)
{
    lrequest *r = (lrequest *)luaL_checkudata(L, 1, WS_REQUEST_MT);
    if (!r->req) return luaL_error(L, "wait: this request was already waited for");
    ws_comm_request *q = r->req;
    r->req = NULL;
    ws_status rc = ws_comm_wait(q);
    drop_owner(r);
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 1); /* the tensors need not stay alive any longer */
    if (rc != WS_OK) return ws_lua_raise(L, NULL);
    return 0;
}

static int r_gc(lua_State *L)
{
    lrequest *r = (lrequest *)luaL_checkudata(L, 1, WS_REQUEST_MT);
    if (r->req) {
        ws_comm_request *q = r->req;
        r->req = NULL;
        if (ws_comm_wait(q) != WS_OK) lua_warning(L, ws_errmsg(), 0);
    }
    drop_owner(r);
    return 0;
}

static int r_pending(lua_State *L)
{
    lrequest *r = (lrequest *)luaL_checkudata(L, 1, WS_REQUEST_MT);
    lua_pushboolean(L, r->req != NULL);
    return 1;
}

static int r_tostring(lua_State *L)
{
    lrequest *r = (lrequest *)luaL_checkudata(L, 1, WS_REQUEST_MT);
    lua_pushstring(L, r->req ? "ws.Request(pending)" : "ws.Request(done)");
    return 1;
}

/* ---- collectives: each has a blocking and an async form ---------------------- */

static ws_reduce_op check_op(lua_State *L, int idx)
{
    const char *op = luaL_optstring(L, idx, "sum");
    if (strcmp(op, "sum") == 0) return WS_REDUCE_SUM;
    if (strcmp(op, "max") == 0) return WS_REDUCE_MAX;
    return (ws_reduce_op)luaL_argerror(L, idx, lua_pushfstring(L, "op must be \"sum\" or "
                                                                  "\"max\", got '%s'", op));
}

/* Returns to Lua: the request (async) or the output argument (blocking). */
static int done(lua_State *L, ws_status rc, lrequest *r, ws_comm_request *q, int out_idx)
{
    if (rc != WS_OK) return ws_lua_raise(L, NULL);
    if (r) {
        r->req = q;
        if (q) hold_owner(L, r);
        return 1; /* the request is on top */
    }
    lua_pushvalue(L, out_idx);
    return 1;
}

static int gather(lua_State *L, int async)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    ws_tensor *send = ws_lua_check_tensor(L, 2);
    lrequest *r = NULL;
    ws_comm_request *q = NULL;
    ws_status rc;
    if (lua_istable(L, 3)) {
        size_t n;
        /* [.., list]: stays on the stack so the array outlives the call */
        ws_tensor **list = ws_lua_check_tensor_list(L, 3, &n);
        if (async) r = new_request(L);
        rc = ws_comm_all_gather_list(c, send, list, n, async ? &q : NULL);
    } else {
        ws_tensor *recv = ws_lua_check_tensor(L, 3);
        if (async) r = new_request(L);
        rc = ws_comm_all_gather(c, send, recv, async ? &q : NULL);
    }
    return done(L, rc, r, q, 3);
}

static int c_all_gather(lua_State *L) { return gather(L, 0); }
static int c_all_gather_async(lua_State *L) { return gather(L, 1); }

static int bcast(lua_State *L, int async)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    ws_tensor *t = ws_lua_check_tensor(L, 2);
    int root = check_int(L, 3, "root");
    lrequest *r = async ? new_request(L) : NULL;
    ws_comm_request *q = NULL;
    ws_status rc = ws_comm_broadcast(c, t, root, async ? &q : NULL);
    return done(L, rc, r, q, 2);
}

static int c_broadcast(lua_State *L) { return bcast(L, 0); }
static int c_broadcast_async(lua_State *L) { return bcast(L, 1); }

static int p2p(lua_State *L, int async, int is_send)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    ws_tensor *t = ws_lua_check_tensor(L, 2);
    int peer = check_int(L, 3, "peer");
    lrequest *r = async ? new_request(L) : NULL;
    ws_comm_request *q = NULL;
    ws_status rc = is_send ? ws_comm_send(c, t, peer, async ? &q : NULL)
                           : ws_comm_recv(c, t, peer, async ? &q : NULL);
    return done(L, rc, r, q, 2);
}

static int c_send(lua_State *L) { return p2p(L, 0, 1); }
static int c_send_async(lua_State *L) { return p2p(L, 1, 1); }
static int c_recv(lua_State *L) { return p2p(L, 0, 0); }
static int c_recv_async(lua_State *L) { return p2p(L, 1, 0); }

static int allreduce(lua_State *L, int async)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    ws_tensor *t = ws_lua_check_tensor(L, 2);
    ws_reduce_op op = check_op(L, 3);
    lrequest *r = async ? new_request(L) : NULL;
    ws_comm_request *q = NULL;
    ws_status rc = ws_comm_all_reduce(c, t, op, async ? &q : NULL);
    return done(L, rc, r, q, 2);
}

static int c_all_reduce(lua_State *L) { return allreduce(L, 0); }
static int c_all_reduce_async(lua_State *L) { return allreduce(L, 1); }

static int rscatter(lua_State *L, int async)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    ws_tensor *send = ws_lua_check_tensor(L, 2);
    ws_tensor *recv = ws_lua_check_tensor(L, 3);
    ws_reduce_op op = check_op(L, 4);
    lrequest *r = async ? new_request(L) : NULL;
    ws_comm_request *q = NULL;
    ws_status rc = ws_comm_reduce_scatter(c, send, recv, op, async ? &q : NULL);
    return done(L, rc, r, q, 3);
}

static int c_reduce_scatter(lua_State *L) { return rscatter(L, 0); }
static int c_reduce_scatter_async(lua_State *L) { return rscatter(L, 1); }

/* A list of comm.size byte counts at idx into counts, their running sums
 * (each part right after the previous one) into displs. */
static void check_counts(lua_State *L, int idx, int n, size_t *counts, size_t *displs)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    if ((int)luaL_len(L, idx) != n)
        luaL_argerror(L, idx, lua_pushfstring(L, "needs one byte count per rank (%d), got %d", n,
                                              (int)luaL_len(L, idx)));
    size_t at = 0;
    for (int q = 0; q < n; q++) {
        lua_geti(L, idx, q + 1);
        lua_Integer v = lua_tointeger(L, -1);
        if (!lua_isinteger(L, -1) || v < 0)
            luaL_argerror(L, idx, lua_pushfstring(L, "count %d must be a byte count >= 0", q + 1));
        lua_pop(L, 1);
        counts[q] = (size_t)v;
        displs[q] = at;
        at += (size_t)v;
    }
}

/* comm:all_to_all(send, send_counts, recv, recv_counts): send_counts[q + 1]
 * bytes to rank q, the parts one after another in send; recv likewise. */
static int c_all_to_all(lua_State *L)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    ws_tensor *send = ws_lua_check_tensor(L, 2);
    ws_tensor *recv = ws_lua_check_tensor(L, 4);
    int n = ws_comm_size(c);
    /* Lua-owned, so a raised error leaks nothing. */
    size_t *a = (size_t *)lua_newuserdatauv(L, 4 * (size_t)n * sizeof *a, 0);
    check_counts(L, 3, n, a, a + n);
    check_counts(L, 5, n, a + 2 * n, a + 3 * n);
    ws_status rc = ws_comm_all_to_all(c, send, a, a + n, recv, a + 2 * n, a + 3 * n, NULL);
    return done(L, rc, NULL, NULL, 4);
}

static int c_barrier(lua_State *L)
{
    if (ws_comm_barrier(ws_lua_check_comm(L, 1)) != WS_OK) return ws_lua_raise(L, NULL);
    return 0;
}

static int c_set_check(lua_State *L)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    luaL_checkany(L, 2);
    ws_comm_set_check(c, lua_toboolean(L, 2));
    return 0;
}

/* comm:reference(op, bytes [, iters=10]) -> seconds per iteration of raw MPI. */
static int c_reference(lua_State *L)
{
    ws_comm *c = ws_lua_check_comm(L, 1);
    const char *op = luaL_checkstring(L, 2);
    lua_Integer bytes = luaL_checkinteger(L, 3);
    lua_Integer iters = luaL_optinteger(L, 4, 10);
    luaL_argcheck(L, bytes >= 0, 3, "bytes must be >= 0");
    luaL_argcheck(L, iters >= 1 && iters <= 1000000, 4, "iters must be in 1..1000000");
    double s;
    if (ws_comm_reference(c, op, (size_t)bytes, (int)iters, &s) != WS_OK)
        return ws_lua_raise(L, NULL);
    lua_pushnumber(L, s);
    return 1;
}

static const luaL_Reg comm_methods[] = {
    {"split", c_split},
    {"all_gather", c_all_gather},
    {"all_gather_async", c_all_gather_async},
    {"all_to_all", c_all_to_all},
    {"broadcast", c_broadcast},
    {"broadcast_async", c_broadcast_async},
    {"send", c_send},
    {"send_async", c_send_async},
    {"recv", c_recv},
    {"recv_async", c_recv_async},
    {"all_reduce", c_all_reduce},
    {"all_reduce_async", c_all_reduce_async},
    {"reduce_scatter", c_reduce_scatter},
    {"reduce_scatter_async", c_reduce_scatter_async},
    {"barrier", c_barrier},
    {"set_check", c_set_check},
    {"reference", c_reference},
    {"free", c_free},
    {NULL, NULL},
};

/* Methods first (upvalue 1), then the fields rank, size, local_rank, backend, check. */
static int c_index(lua_State *L)
{
    lua_pushvalue(L, 2);
    if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
    const char *k = lua_tostring(L, 2);
    lcomm *lc = (lcomm *)luaL_checkudata(L, 1, WS_COMM_MT);
    if (!k || !lc->c) return 0;
    if (strcmp(k, "rank") == 0) lua_pushinteger(L, ws_comm_rank(lc->c));
    else if (strcmp(k, "size") == 0) lua_pushinteger(L, ws_comm_size(lc->c));
    else if (strcmp(k, "local_rank") == 0) lua_pushinteger(L, ws_comm_local_rank(lc->c));
    else if (strcmp(k, "backend") == 0) lua_pushstring(L, ws_comm_backend(lc->c));
    else if (strcmp(k, "check") == 0) lua_pushboolean(L, ws_comm_get_check(lc->c));
    else return 0;
    return 1;
}

static const luaL_Reg request_methods[] = {
    {"wait", r_wait},
    {"pending", r_pending},
    {NULL, NULL},
};

static const luaL_Reg comm_meta[] = {
    {"__gc", c_gc},
    {"__close", c_close},
    {"__tostring", c_tostring},
    {NULL, NULL},
};

static const luaL_Reg request_meta[] = {
    {"__gc", r_gc},
    {"__tostring", r_tostring},
    {NULL, NULL},
};

void ws_open_comm(lua_State *L)
{
    /* [ws] */
    ws_lua_new_type(L, WS_COMM_MT, comm_methods, comm_meta, c_index);
    ws_lua_new_type(L, WS_REQUEST_MT, request_methods, request_meta, NULL);
    lua_pushcfunction(L, l_comm);
    lua_setfield(L, -2, "comm");
}
