/* ws_api.c: libwshost, the C API of host/ws.h over a Lua state that runs
 * ws.session.
 *
 * Every entry point runs its Lua work inside one lua_pcall (through `run`),
 * so no Lua error unwinds into the caller; the error text lands in the host.
 * A protected function allocates no C memory that outlives it: what a call
 * hands out is copied after the protected call returned. The host keeps in
 * one registry table (`keep`) what must outlive a call: the session, the
 * tensors from ws_host_alloc, the last answer of ws_host_expected. */
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "bind.h"
#include "comm.h"
#include "ws.h"

#ifdef WS_HAVE_MPI
#include <mpi.h>
#endif

#ifndef WSHOST_VERSION
#define WSHOST_VERSION "dev"
#endif

struct ws_host {
    lua_State *L;
    int keep;    /* registry ref of the table of what outlives a call */
    int loaded;  /* a session is open */
    int closed;  /* ws_host_close ran */
    int busy;    /* inside a call: callbacks must not reenter */
    char *error; /* "" or malloc'd message */
};

static char empty[] = "";
static char nomem_msg[] = "wshost: out of memory for the error message";

static void set_error(ws_host *h, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(ws_host *h, const char *fmt, ...)
{
    if (h->error != empty && h->error != nomem_msg) free(h->error);
    h->error = empty;
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) s = NULL;
    va_end(ap);
    h->error = s ? s : nomem_msg;
}

static void clear_error(ws_host *h)
{
    if (h->error != empty && h->error != nomem_msg) free(h->error);
    h->error = empty;
}

/* ---- process setup ------------------------------------------------------------- */

/* A program that dlopens libwshost (Python's import does) loads libmpi with
 * RTLD_LOCAL, and Open MPI's plugins then cannot see its symbols. Making the
 * already loaded libmpi global (RTLD_NOLOAD: no second copy) fixes that. MPI
 * itself starts later, when the session's comm asks for it. */
static void mpi_symbols_global(void)
{
#ifdef WS_HAVE_MPI
    Dl_info info;
    if (dladdr((void *)MPI_Init, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
#endif
}

/* A step that failed on one rank of an mpirun job leaves the other ranks
 * waiting in a collective this one will never join (in server mode each
 * rank's engine process can fail alone). MPI_Finalize at exit would wait
 * for them too, so the job is ended instead, as the wshost program does
 * after an error. */
static volatile int failed_multi;

static void shutdown_comm(void)
{
    if (failed_multi) ws_comm_abort(EXIT_FAILURE);
    ws_comm_shutdown();
}

static void process_setup(void)
{
    static int done;
    if (done) return;
    done = 1;
    mpi_symbols_global();
    atexit(shutdown_comm); /* MPI_Finalize once, after every host is gone */
}

/* ---- protected calls ---------------------------------------------------------- */

/* The error as text: a string, or an object with __tostring (ws.errors). */
static int msghandler(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TSTRING) return 1;
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    return 1;
}

/* Calls fn(args) protected with nres results left on the stack; on failure
 * records the message (prefixed with `what` unless it already starts with
 * it) and returns -1 with the stack as it was. */
static int run(ws_host *h, const char *what, lua_CFunction fn, void *args, int nres)
{
    lua_State *L = h->L;
    int base = lua_gettop(L);
    lua_pushcfunction(L, msghandler);
    lua_pushcfunction(L, fn);
    lua_pushlightuserdata(L, args);
    lua_pushlightuserdata(L, h);
    h->busy = 1;
    int rc = lua_pcall(L, 2, nres, base + 1);
    h->busy = 0;
    lua_remove(L, base + 1); /* the handler */
    if (rc == LUA_OK) {
        clear_error(h);
        return 0;
    }
    const char *msg = lua_tostring(L, -1);
    if (!msg) msg = "(no message)";
    size_t n = strlen(what);
    if (strncmp(msg, what, n) == 0 && msg[n] == ':')
        set_error(h, "%s", msg);
    else
        set_error(h, "%s: %s", what, msg);
    lua_settop(L, base);
    return -1;
}

/* Guards shared by every entry point. */
static int enter(ws_host *h, const char *what, int need_session)
{
    if (!h) return -1;
    if (h->busy) {
        set_error(h, "%s: called from inside a callback of the same host", what);
        return -1;
    }
    if (need_session && !h->loaded) {
        set_error(h, "%s: no session: call ws_host_load first", what);
        return -1;
    }
    if (need_session && h->closed) {
        set_error(h, "%s: the session was closed", what);
        return -1;
    }
    /* An interrupt that came while no call ran belongs to none: it must not
     * fail this one. */
    if (h->L) lua_sethook(h->L, NULL, 0, 0);
    return 0;
}

/* Pushes the keep table and its field `key`. [..., keep, value] */
static void push_kept(lua_State *L, ws_host *h, const char *key)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->keep);
    lua_getfield(L, -1, key);
}

/* Pushes S:method and S, ready for lua_call with the arguments after them. */
static void push_method(lua_State *L, ws_host *h, const char *method)
{
    push_kept(L, h, "session"); /* [keep, S] */
    lua_getfield(L, -1, method); /* [keep, S, fn] */
    if (!lua_isfunction(L, -1)) luaL_error(L, "the session has no method '%s'", method);
    lua_insert(L, -3);
    lua_remove(L, -2); /* [fn, S] */
}

static ws_host *host_arg(lua_State *L) { return (ws_host *)lua_touserdata(L, 2); }

/* ---- life cycle -------------------------------------------------------------------- */

static int p_open(lua_State *L)
{
    ws_host *h = host_arg(L);
    luaL_openlibs(L);
    luaL_requiref(L, "ws", luaopen_ws, 1); /* package.loaded.ws and global ws, as wshost */
    lua_pop(L, 1);
    lua_newtable(L);
    lua_newtable(L);
    lua_setfield(L, -2, "allocs");
    h->keep = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

ws_host *ws_host_new(void)
{
    process_setup();
    ws_host *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->error = empty;
    h->keep = LUA_NOREF;
    h->L = luaL_newstate();
    if (!h->L) {
        free(h);
        return NULL;
    }
    if (run(h, "ws_host_new", p_open, NULL, 0) != 0) { /* out of memory */
        ws_host_free(h);
        return NULL;
    }
    lua_gc(h->L, LUA_GCGEN, 0, 0);
    return h;
}

void ws_host_free(ws_host *h)
{
    if (!h) return;
    /* From inside one of its own callbacks the state is in use: refused (the
     * host stays valid; free it after the call returns). */
    if (h->busy) {
        set_error(h, "free: called from inside a callback of the same host; free it after the "
                     "call returns");
        return;
    }
    if (h->L) lua_close(h->L); /* __gc releases tensors, pools and lent memory */
    clear_error(h);
    free(h);
}

const char *ws_host_error(const ws_host *h) { return h ? h->error : "ws_host_error: NULL host"; }

const char *ws_host_version(void) { return WSHOST_VERSION; }

void ws_host_free_string(char *s) { free(s); }

static void stop_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted!");
}

void ws_host_interrupt(ws_host *h)
{
    if (!h || !h->L) return;
    lua_sethook(h->L, stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1);
}

/* ---- load ------------------------------------------------------------------------------ */

typedef struct load_args {
    const char *path;
    size_t n;
    const char *const *keys, *const *values;
} load_args;

static int p_load(lua_State *L)
{
    load_args *a = lua_touserdata(L, 1);
    ws_host *h = host_arg(L);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "ws.session");
    lua_call(L, 1, 1); /* [session module] */
    lua_getfield(L, -1, "open");
    lua_pushstring(L, a->path);
    lua_createtable(L, 0, (int)a->n);
    for (size_t i = 0; i < a->n; i++) {
        if (!a->keys[i] || !a->values[i])
            return luaL_error(L, "config entry %d has a NULL key or value", (int)i + 1);
        lua_pushstring(L, a->values[i]);
        lua_setfield(L, -2, a->keys[i]);
    }
    lua_call(L, 2, 1); /* [module, S] */
    if (lua_isnoneornil(L, -1))
        return luaL_error(L, "ws.session.open('%s') returned no session", a->path);
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->keep);
    lua_insert(L, -2);
    lua_setfield(L, -2, "session");
    return 0;
}

int ws_host_load(ws_host *h, const char *path, size_t n, const char *const *keys,
                 const char *const *values)
{
    if (enter(h, "load", 0) != 0) return -1;
    if (h->loaded || h->closed) {
        set_error(h, "load: this host already %s a session; create another host",
                  h->closed ? "closed" : "has");
        return -1;
    }
    if (!path || (n && (!keys || !values))) {
        set_error(h, "load: NULL pipeline path or config arrays");
        return -1;
    }
    load_args a = {path, n, keys, values};
    if (run(h, "load", p_load, &a, 0) != 0) return -1;
    h->loaded = 1;
    return 0;
}

/* ---- expected --------------------------------------------------------------------------- */

typedef struct expected_args {
    const char *role;
    size_t i;
    ws_host_param *out;
    int end;
} expected_args;

static int read_shape_field(lua_State *L, int idx, int64_t *shape, const char *what)
{
    idx = lua_absindex(L, idx);
    if (!lua_istable(L, idx)) return luaL_error(L, "%s: shape is not a table", what);
    lua_Integer n = luaL_len(L, idx);
    if (n > WS_HOST_MAX_DIMS) return luaL_error(L, "%s: more than %d dimensions", what, WS_HOST_MAX_DIMS);
    for (lua_Integer k = 1; k <= n; k++) {
        lua_geti(L, idx, k);
        int isnum;
        lua_Integer v = lua_tointegerx(L, -1, &isnum);
        if (!isnum) return luaL_error(L, "%s: shape[%d] is not an integer", what, (int)k);
        shape[k - 1] = (int64_t)v;
        lua_pop(L, 1);
    }
    return (int)n;
}

static int p_expected(lua_State *L)
{
    expected_args *a = lua_touserdata(L, 1);
    ws_host *h = host_arg(L);
    if (a->i == 0) {
        push_method(L, h, "expected");
        lua_pushstring(L, a->role);
        lua_call(L, 2, 1); /* [list] */
        if (!lua_istable(L, -1)) return luaL_error(L, "S:expected did not return a list");
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->keep);
        lua_insert(L, -2);
        lua_setfield(L, -2, "expected"); /* strings handed out live here */
        lua_pop(L, 1);
    }
    push_kept(L, h, "expected"); /* [keep, list] */
    if (!lua_istable(L, -1)) return luaL_error(L, "ask with i = 0 first");
    if ((lua_Integer)a->i >= luaL_len(L, -1)) {
        a->end = 1;
        return 0;
    }
    lua_geti(L, -1, (lua_Integer)a->i + 1); /* [keep, list, entry] */
    lua_getfield(L, -1, "name");
    a->out->name = lua_tostring(L, -1);
    lua_getfield(L, -2, "dtype");
    a->out->dtype = lua_tostring(L, -1);
    if (!a->out->name || !a->out->dtype)
        return luaL_error(L, "entry %d has no name or dtype", (int)a->i + 1);
    lua_getfield(L, -3, "shape");
    a->out->ndim = read_shape_field(L, -1, a->out->shape, a->out->name);
    return 0; /* the strings stay reachable from keep.expected */
}

int ws_host_expected(ws_host *h, const char *role, size_t i, ws_host_param *out)
{
    if (enter(h, "expected", 1) != 0) return -1;
    if (!role || !out) {
        set_error(h, "expected: NULL role or output");
        return -1;
    }
    memset(out, 0, sizeof *out);
    expected_args a = {role, i, out, 0};
    if (run(h, "expected", p_expected, &a, 0) != 0) return -1;
    return a.end ? 1 : 0;
}

/* ---- register ---------------------------------------------------------------------------- */

typedef struct register_args {
    const char *role, *name;
    const ws_host_memory *mem;
    int global_ndim;
    const int64_t *global_shape;
    int owned; /* the tensor took over mem->release */
} register_args;

static int check_shape(lua_State *L, const char *what, int ndim, const int64_t *shape)
{
    if (ndim < 0 || ndim > WS_HOST_MAX_DIMS)
        return luaL_error(L, "%s: %d dimensions (0 to %d)", what, ndim, WS_HOST_MAX_DIMS);
    for (int k = 0; k < ndim; k++)
        if (shape[k] < 0) return luaL_error(L, "%s: negative size in dimension %d", what, k + 1);
    return 0;
}

static ws_device *memory_device(lua_State *L, const ws_host_memory *m, const char *what)
{
    if (m->device_type == WS_HOST_CPU) return ws_device_cpu();
    if (m->device_type != WS_HOST_CUDA)
        luaL_error(L, "%s: device type %d (wshost takes cpu = 1 and cuda = 2)", what,
                   m->device_type);
    char dev[32];
    snprintf(dev, sizeof dev, "cuda:%d", m->device_index);
    ws_device *d;
    if (ws_device_get(dev, &d) != WS_OK) luaL_error(L, "%s: %s", what, ws_errmsg());
    return d;
}

static void push_shape(lua_State *L, int ndim, const int64_t *shape)
{
    lua_createtable(L, ndim, 0);
    for (int k = 0; k < ndim; k++) {
        lua_pushinteger(L, (lua_Integer)shape[k]);
        lua_rawseti(L, -2, k + 1);
    }
}

static int p_register(lua_State *L)
{
    register_args *a = lua_touserdata(L, 1);
    ws_host *h = host_arg(L);
    const ws_host_memory *m = a->mem;
    char what[512];
    snprintf(what, sizeof what, "%s tensor '%s'", a->role, a->name);
    ws_dtype dt;
    if (!m->dtype || ws_dtype_parse(m->dtype, &dt) != 0)
        return luaL_error(L, "%s: unknown dtype '%s' (f32, bf16, f16, fp8, u8, i32, i64)", what,
                          m->dtype ? m->dtype : "(null)");
    check_shape(L, what, m->ndim, m->shape);
    if (a->global_ndim) check_shape(L, what, a->global_ndim, a->global_shape);
    ws_device *dev = memory_device(L, m, what);
    if (!m->data && m->nbytes) return luaL_error(L, "%s: NULL data", what);
    ws_external ext = {.data = m->data, .nbytes = m->nbytes, .device = dev, .read_only = 0,
                       .source = "the caller's memory", .release = m->release,
                       .release_ctx = m->release_ctx};
    ws_ltensor *lt = ws_lua_new_tensor(L); /* [t] released until filled */
    if (ws_tensor_external(&lt->t, &ext, dt, m->ndim, m->shape, a->name) != WS_OK)
        return luaL_error(L, "%s: %s", what, ws_errmsg());
    a->owned = 1; /* from here the tensor's __gc releases the memory */
    int t = lua_gettop(L);
    push_method(L, h, "add");
    lua_pushstring(L, a->role);
    lua_pushstring(L, a->name);
    lua_pushvalue(L, t);
    if (a->global_ndim)
        push_shape(L, a->global_ndim, a->global_shape);
    else
        lua_pushnil(L);
    lua_pushboolean(L, 1); /* the session frees this wrapper at close */
    lua_call(L, 6, 0);
    return 0;
}

int ws_host_register(ws_host *h, const char *role, const char *name, const ws_host_memory *mem,
                     int global_ndim, const int64_t *global_shape)
{
    int bad_args = !role || !name || !mem || (global_ndim && !global_shape);
    if (!h || enter(h, "register", 1) != 0 || bad_args) {
        if (h && bad_args && !h->busy) set_error(h, "register: NULL role, name, memory or global shape");
        if (mem && mem->release) mem->release(mem->release_ctx);
        return -1;
    }
    register_args a = {role, name, mem, global_ndim, global_shape, 0};
    if (run(h, "register", p_register, &a, 0) != 0) {
        if (!a.owned && mem->release) mem->release(mem->release_ctx);
        return -1;
    }
    return 0;
}

/* ---- alloc --------------------------------------------------------------------------------- */

typedef struct alloc_args {
    const char *name, *dtype;
    int ndim;
    const int64_t *shape;
    ws_host_memory *out;
} alloc_args;

static int p_alloc(lua_State *L)
{
    alloc_args *a = lua_touserdata(L, 1);
    ws_host *h = host_arg(L);
    check_shape(L, a->name, a->ndim, a->shape);
    push_method(L, h, "alloc");
    lua_pushstring(L, a->name);
    push_shape(L, a->ndim, a->shape);
    lua_pushstring(L, a->dtype);
    lua_call(L, 4, 1); /* [t] */
    ws_tensor *t = ws_lua_check_tensor(L, -1);
    if (!ws_tensor_is_contiguous(t))
        return luaL_error(L, "S:alloc returned a non-contiguous tensor for '%s'", a->name);
    void *p;
    if (ws_tensor_access(t, WS_ACCESS_WRITE, a->name, &p) != WS_OK)
        return luaL_error(L, "%s", ws_errmsg());
    ws_host_memory *o = a->out;
    ws_device *d = ws_tensor_device(t);
    o->data = p;
    o->nbytes = ws_tensor_nbytes(t);
    o->device_type = d->kind == WS_DEVICE_CUDA ? WS_HOST_CUDA : WS_HOST_CPU;
    o->device_index = d->kind == WS_DEVICE_CUDA ? d->index : 0;
    o->dtype = ws_dtype_name(t->dtype);
    o->ndim = t->layout.ndim;
    for (int k = 0; k < t->layout.ndim; k++) o->shape[k] = t->layout.shape[k];
    push_kept(L, h, "allocs"); /* [t, keep, allocs] */
    lua_pushvalue(L, -3);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    return 0;
}

int ws_host_alloc(ws_host *h, const char *name, int ndim, const int64_t *shape, const char *dtype,
                  ws_host_memory *out)
{
    if (enter(h, "alloc", 1) != 0) return -1;
    if (!name || !dtype || !out || (ndim && !shape)) {
        set_error(h, "alloc: NULL name, dtype, shape or output");
        return -1;
    }
    memset(out, 0, sizeof *out);
    alloc_args a = {name, dtype, ndim, shape, out};
    return run(h, "alloc", p_alloc, &a, 0);
}

/* ---- callbacks ------------------------------------------------------------------------------ */

/* The Lua function given to S:on. Upvalues: the event name, the callback and
 * its ud (light userdata). */
static int call_callback(lua_State *L)
{
    // cppcheck-suppress unreadVariable ; read in the call below
    const char *event = lua_tostring(L, lua_upvalueindex(1));
    ws_host_callback fn = *(ws_host_callback *)lua_touserdata(L, lua_upvalueindex(2));
    void *ud = lua_touserdata(L, lua_upvalueindex(3));
    long long arg = 0;
    const char *sarg = NULL;
    if (lua_type(L, 1) == LUA_TNUMBER)
        arg = (long long)lua_tointeger(L, 1);
    else if (lua_type(L, 1) == LUA_TSTRING)
        sarg = lua_tostring(L, 1);
    char err[1024] = "";
    if (fn(ud, event, arg, sarg, err, sizeof err) != 0) {
        /* No file position: the message is the caller's, about its callback. */
        lua_pushfstring(L, "%s callback failed: %s", event, err[0] ? err : "(no message)");
        return lua_error(L);
    }
    return 0;
}

typedef struct on_args {
    const char *event;
    ws_host_callback fn;
    void *ud;
} on_args;

static int p_on(lua_State *L)
{
    on_args *a = lua_touserdata(L, 1);
    ws_host *h = host_arg(L);
    push_method(L, h, "on");
    lua_pushstring(L, a->event);
    lua_pushstring(L, a->event);
    /* A function pointer is not a void *: keep it in a small userdata. */
    ws_host_callback *slot = lua_newuserdatauv(L, sizeof *slot, 0);
    *slot = a->fn;
    lua_pushlightuserdata(L, a->ud);
    lua_pushcclosure(L, call_callback, 3);
    lua_call(L, 3, 0);
    return 0;
}

int ws_host_on(ws_host *h, const char *event, ws_host_callback fn, void *ud)
{
    if (enter(h, "on", 1) != 0) return -1;
    if (!event || !fn) {
        set_error(h, "on: NULL event or callback");
        return -1;
    }
    on_args a = {event, fn, ud};
    return run(h, "on", p_on, &a, 0);
}

/* ---- step and close --------------------------------------------------------------------------- */

/* Waits for wshost's work on the GPUs it has used: a step returns with its
 * copies done, so the caller may read or free what it lent. A GPU wshost
 * never touched is left alone (no context is made on it). */
static int sync_devices(lua_State *L)
{
    int n = ws_device_cuda_count();
    for (int i = 0; i < n; i++) {
        char name[32];
        ws_device *d;
        snprintf(name, sizeof name, "cuda:%d", i);
        if (ws_device_get(name, &d) == WS_OK && ws_device_in_use(d) &&
            ws_device_synchronize(d) != WS_OK)
            return luaL_error(L, "%s", ws_errmsg());
    }
    return 0;
}

typedef struct call_args {
    const char *method;
    int want_json;
} call_args;

/* S:<method>() and its result as JSON text on the stack (when wanted). */
static int p_call_json(lua_State *L)
{
    call_args *a = lua_touserdata(L, 1);
    ws_host *h = host_arg(L);
    push_method(L, h, a->method);
    lua_call(L, 1, 1); /* [result] */
    sync_devices(L);
    if (!a->want_json) return 0;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "ws.json");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "encode"); /* [result, json, encode] */
    lua_pushvalue(L, -3);
    lua_call(L, 1, 1); /* [result, json, text] */
    return 1;
}

static int call_json(ws_host *h, const char *method, char **out)
{
    if (out) *out = NULL;
    call_args a = {method, out != NULL};
    if (run(h, method, p_call_json, &a, out ? 1 : 0) != 0) return -1;
    if (!out) return 0;
    size_t len;
    const char *text = lua_tolstring(h->L, -1, &len);
    char *copy = malloc(len + 1);
    if (copy) memcpy(copy, text, len + 1);
    lua_pop(h->L, 1);
    if (!copy) {
        set_error(h, "%s: out of memory for the %zu-byte JSON result", method, len);
        return -1;
    }
    *out = copy;
    return 0;
}

int ws_host_step(ws_host *h, char **record)
{
    if (record) *record = NULL;
    if (enter(h, "step", 1) != 0) return -1;
    int rc = call_json(h, "step", record);
    if (rc != 0 && ws_comm_is_multi()) failed_multi = 1;
    return rc;
}

int ws_host_close(ws_host *h, char **summary)
{
    if (summary) *summary = NULL;
    if (enter(h, "close", 1) != 0) return -1;
    h->closed = 1; /* also after a failed close: the session is in no state to go on */
    /* The alloc'd tensors go with the session's pools: the host lets go of
     * them first, so that the session can free the pools. */
    lua_rawgeti(h->L, LUA_REGISTRYINDEX, h->keep);
    lua_newtable(h->L);
    lua_setfield(h->L, -2, "allocs");
    lua_pop(h->L, 1);
    lua_gc(h->L, LUA_GCCOLLECT);
    return call_json(h, "close", summary);
}

/* ---- devices ------------------------------------------------------------------------------------ */

static ws_device *cuda_device(int index)
{
    char name[32];
    ws_device *d;
    snprintf(name, sizeof name, "cuda:%d", index);
    return ws_device_get(name, &d) == WS_OK ? d : NULL;
}

void *ws_host_cuda_stream(int index)
{
    ws_device *d = cuda_device(index);
    return d && d->ops->native_stream ? d->ops->native_stream(d) : NULL;
}

int ws_host_cuda_synchronize(int index, char *err, size_t errlen)
{
    ws_device *d = cuda_device(index);
    if (!d || ws_device_synchronize(d) != WS_OK) {
        if (err && errlen) snprintf(err, errlen, "cuda:%d: %s", index, ws_errmsg());
        return -1;
    }
    return 0;
}
