/* module.c: luaopen_ws, the `ws` table shared by wshost and ws.so.
 *
 * Registers every native type (one binding file each), the small misc
 * functions (version, log, clocks, memory, interruption, reference copy) and
 * installs the searcher that finds the host's Lua library (lua/ws/...) at
 * run time, leaving package.path to the user. Nothing here probes a device:
 * `wshost -e ''` must stay fast. */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lualib.h>

#include "bind.h"
#include "env.h"
#include "plan.h"

#ifndef WSHOST_VERSION
#define WSHOST_VERSION "dev"
#endif

/* ---- misc functions -------------------------------------------------------- */

static int l_now_ms(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6);
    return 1;
}

static int l_interrupted(lua_State *L)
{
    lua_pushboolean(L, ws_lua_is_interrupted());
    return 1;
}

/* {rss=, peak_rss=} in bytes, from /proc/self/status (VmRSS, VmHWM). */
static int l_host_memory(lua_State *L)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return luaL_error(L, "host_memory: cannot open /proc/self/status");
    long long rss = -1, hwm = -1;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "VmRSS:", 6) == 0) rss = atoll(line + 6);
        if (strncmp(line, "VmHWM:", 6) == 0) hwm = atoll(line + 6);
    }
    fclose(f);
    if (rss < 0) return luaL_error(L, "host_memory: no VmRSS in /proc/self/status");
    ws_lua_int_field fields[] = {{"rss", (lua_Integer)(rss * 1024)},
                                 {"peak_rss", (lua_Integer)((hwm < 0 ? rss : hwm) * 1024)}};
    ws_lua_push_int_fields(L, fields, 2, 0);
    return 1;
}

/* ws.isatty(fd): lets reports draw progress only on a terminal. */
static int l_isatty(lua_State *L)
{
    lua_Integer fd = luaL_checkinteger(L, 1);
    luaL_argcheck(L, fd >= 0 && fd <= INT_MAX, 1, "file descriptor out of range");
    lua_pushboolean(L, isatty((int)fd) == 1);
    return 1;
}

/* ws.reference_read(path [, dst]) -> bytes: reads the whole file with
 * read(2), into the cpu tensor dst (its bytes from the start; it must be large
 * enough) or, without one, through a reused 16 MiB buffer: the reference a
 * checkpoint load is measured against (bench/load.lua). */
static int l_reference_read(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    char *dst = NULL, *buf = NULL;
    size_t cap = (size_t)16 << 20;
    if (!lua_isnoneornil(L, 2)) {
        ws_tensor *t = ws_lua_check_tensor(L, 2);
        if (ws_tensor_device(t)->kind != WS_DEVICE_CPU || !ws_tensor_is_contiguous(t))
            return luaL_argerror(L, 2, "a contiguous cpu tensor");
        void *p;
        if (ws_tensor_access(t, WS_ACCESS_WRITE, "reference_read", &p) != WS_OK)
            return ws_lua_raise(L, NULL);
        dst = p;
        cap = ws_tensor_nbytes(t);
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        int err = fd < 0 ? errno : 0;
        if (fd >= 0) close(fd);
        lua_pushnil(L);
        lua_pushfstring(L, "reference_read: cannot read '%s': %s", path,
                        err ? strerror(err) : "not a regular file");
        lua_pushstring(L, "io");
        return 3;
    }
    if (!dst && !(buf = malloc(cap))) {
        close(fd);
        return luaL_error(L, "reference_read: out of memory for a buffer");
    }
    size_t total = 0;
    int err = 0;
    for (;;) {
        char *at = dst ? dst + total : buf;
        size_t room = dst ? cap - total : cap;
        if (dst && room == 0) { /* full: the file must end here */
            char probe;
            ssize_t more = read(fd, &probe, 1);
            if (more < 0 && errno == EINTR) continue;
            err = more < 0 ? errno : more > 0 ? EFBIG : 0;
            break;
        }
        ssize_t got = read(fd, at, room);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) err = errno;
        if (got <= 0) break;
        total += (size_t)got;
    }
    free(buf);
    close(fd);
    if (err) {
        lua_pushnil(L);
        lua_pushfstring(L, "reference_read: '%s': %s", path, strerror(err));
        lua_pushstring(L, "io");
        return 3;
    }
    if (dst) ws_tensor_mark_written(ws_lua_check_tensor(L, 2));
    lua_pushinteger(L, (lua_Integer)total);
    return 1;
}

/* ws.mkdir(path) -> true | nil, message, "io": creates a directory and its
 * missing parents (mkdir -p); an existing directory is fine. */
static int l_mkdir(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    if (len == 0 || len >= PATH_MAX) return luaL_argerror(L, 1, "path is empty or too long");
    char buf[PATH_MAX];
    memcpy(buf, path, len + 1);
    for (char *p = buf + 1;; p++) {
        char c = *p;
        if (c != '/' && c != '\0') continue;
        *p = '\0';
        struct stat st;
        if (mkdir(buf, 0777) != 0 && !(errno == EEXIST && stat(buf, &st) == 0 &&
                                       S_ISDIR(st.st_mode))) {
            lua_pushnil(L);
            lua_pushfstring(L, "mkdir: cannot create directory '%s': %s", buf,
                            errno == EEXIST ? "it exists and is not a directory" : strerror(errno));
            lua_pushstring(L, "io");
            return 3;
        }
        if (c == '\0') break;
        *p = c;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ws.pid() -> this process's id (temporary file names, logs). */
static int l_pid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

/* An unusable launcher rank counts as rank 0 here: logging must not fail,
 * and the comm world reports the value when it starts. */
static int log_rank(void)
{
    const ws_launcher *l;
    ws_env_launcher(&l);
    return l->rank > 0 ? l->rank : 0;
}

/* ws.log(fmt, ...): string.format, then one line on stdout; ranks > 0 are
 * prefixed so interleaved output stays readable. The rank comes from the
 * launcher's environment: logging must not start MPI. */
static int l_log(lua_State *L)
{
    int n = lua_gettop(L);
    luaL_checkstring(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, LUA_STRLIBNAME);
    lua_getfield(L, -1, "format"); /* [args..., loaded, string, format] */
    lua_replace(L, -3);
    lua_pop(L, 1); /* [args..., format] */
    lua_insert(L, 1);
    lua_call(L, n, 1); /* [msg] */
    size_t len;
    const char *msg = lua_tolstring(L, -1, &len);
    int rank = log_rank();
    if (rank > 0)
        fprintf(stdout, "[rank %d] %s\n", rank, msg);
    else
        fprintf(stdout, "%s\n", msg);
    fflush(stdout);
    return 0;
}

/* ws.reference_copy(dst, src): the benchmark reference — one plain memcpy on
 * one thread for host memory, the backend's raw copy (cudaMemcpyAsync) when a
 * GPU is involved. Same dtype and byte count, contiguous. */
static int l_reference_copy(lua_State *L)
{
    ws_tensor *dst = ws_lua_check_tensor(L, 1);
    ws_tensor *src = ws_lua_check_tensor(L, 2);
    size_t n = ws_tensor_nbytes(dst);
    if (n != ws_tensor_nbytes(src) || dst->dtype != src->dtype)
        return luaL_error(L, "reference_copy: dst and src need the same dtype and byte count");
    if (!ws_tensor_is_contiguous(dst) || !ws_tensor_is_contiguous(src))
        return luaL_error(L, "reference_copy: tensors must be contiguous");
    void *dp, *sp;
    if (ws_tensor_access(src, WS_ACCESS_READ, "reference_copy", &sp) != WS_OK ||
        ws_tensor_access(dst, WS_ACCESS_WRITE, "reference_copy", &dp) != WS_OK)
        return ws_lua_raise(L, NULL);
    ws_device *dd = ws_tensor_device(dst), *sd = ws_tensor_device(src);
    if (dd->kind == WS_DEVICE_CPU && sd->kind == WS_DEVICE_CPU) {
        memcpy(dp, sp, n);
    } else {
        ws_device *d = dd->kind == WS_DEVICE_CUDA ? dd : sd;
        /* Like any device op: queued, not awaited (a copy touching host
         * memory has completed on return); time it with dev:synchronize(). */
        if (d->ops->copy(d, dp, sp, n) != WS_OK)
            return ws_lua_raise(L, "reference_copy");
    }
    ws_tensor_mark_written(dst);
    lua_settop(L, 1);
    return 1;
}

/* ---- finding the Lua library ------------------------------------------------------ */

/* The host's Lua library is found by a searcher of its own, placed in
 * package.searchers right after the preload searcher, so that package.path
 * and package.cpath stay exactly what lua(1) makes of LUA_PATH and LUA_CPATH.
 * It looks in WSHOST_PATH's dirs for any module (the user asked for them
 * first), then, for ws.* modules only, in lua/ beside the binary or ws.so and
 * in <prefix>/share/wshost/lua: a dir that happens to sit beside the binary
 * must not shadow the user's own modules. */

static int is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Appends D/?.lua;D/?/init.lua to a template that has *entries entries. An
 * empty entry would end package.searchpath's scan, so none is made. */
static void add_dir(luaL_Buffer *b, int *entries, const char *dir, size_t len)
{
    if (*entries) luaL_addchar(b, ';');
    luaL_addlstring(b, dir, len);
    luaL_addstring(b, "/?.lua;");
    luaL_addlstring(b, dir, len);
    luaL_addstring(b, "/?/init.lua");
    (*entries)++;
}

/* Directory of the file holding this code: the wshost binary or ws.so. */
static int self_dir(char *out, size_t n)
{
    char exe[PATH_MAX], so[PATH_MAX];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (k <= 0) return -1;
    exe[k] = '\0';
    const char *path = exe;
    Dl_info info;
    if (dladdr((void *)luaopen_ws, &info) && info.dli_fname && strchr(info.dli_fname, '/') &&
        realpath(info.dli_fname, so))
        path = so; /* ws.so, or the binary when run by path */
    const char *slash = strrchr(path, '/');
    if (!slash || (size_t)(slash - path) + 1 > n) return -1;
    memcpy(out, path, (size_t)(slash - path));
    out[slash - path] = '\0';
    return 0;
}

/* Pushes the WSHOST_PATH template (ignored under -E). */
static void push_user_template(lua_State *L)
{
    luaL_Buffer b;
    int entries = 0;
    luaL_buffinit(L, &b);
    lua_getfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
    int noenv = lua_toboolean(L, -1);
    lua_pop(L, 1);
    const char *env = noenv ? NULL : ws_env_get("WSHOST_PATH");
    for (const char *p = env; p && *p;) {
        const char *colon = strchr(p, ':');
        size_t len = colon ? (size_t)(colon - p) : strlen(p);
        if (len) add_dir(&b, &entries, p, len);
        p = colon ? colon + 1 : p + len;
    }
    luaL_pushresult(&b);
}

/* Pushes the template of the library's own dirs: lua/ beside the binary or
 * ws.so (the build tree links it to the source lua/), then
 * <prefix>/share/wshost/lua for <prefix>/bin/wshost or
 * <prefix>/lib/<arch>/lua/5.4/ws.so. */
static void push_lib_template(lua_State *L)
{
    luaL_Buffer b;
    int entries = 0;
    luaL_buffinit(L, &b);
    char dir[PATH_MAX];
    if (self_dir(dir, sizeof dir) == 0) {
        char cand[PATH_MAX + 64];
        snprintf(cand, sizeof cand, "%s/lua", dir);
        add_dir(&b, &entries, cand, strlen(cand));
        char up[32] = "";
        for (int level = 1; level <= 4; level++) {
            strncat(up, "/..", sizeof up - strlen(up) - 1);
            snprintf(cand, sizeof cand, "%s%s/share/wshost/lua", dir, up);
            if (is_dir(cand)) {
                char real[PATH_MAX];
                const char *use = realpath(cand, real) ? real : cand;
                add_dir(&b, &entries, use, strlen(use));
                break;
            }
        }
    }
    luaL_pushresult(&b);
}

/* A package.searchers entry. Upvalues: package.searchpath, the WSHOST_PATH
 * template, the library template. Like Lua's own file searcher it returns
 * the loader and the file name, the list of files tried, or nothing when it
 * has no dir to look in (so require's message for other modules is lua(1)'s). */
static int ws_searcher(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    lua_settop(L, 1);
    lua_pushvalue(L, lua_upvalueindex(2));
    if (strncmp(name, "ws.", 3) == 0) {
        size_t nuser, nlib;
        lua_tolstring(L, 2, &nuser);
        lua_tolstring(L, lua_upvalueindex(3), &nlib);
        if (nuser && nlib) lua_pushliteral(L, ";");
        lua_pushvalue(L, lua_upvalueindex(3));
        lua_concat(L, lua_gettop(L) - 1);
    }
    size_t ntemplate;
    lua_tolstring(L, 2, &ntemplate); /* [name, template] */
    if (ntemplate == 0) return 0;
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_call(L, 2, 2); /* [name, template, filename or nil, tried] */
    if (lua_isnil(L, 3)) return 1;
    const char *filename = lua_tostring(L, 3);
    if (luaL_loadfile(L, filename) != LUA_OK)
        return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", name, filename,
                          lua_tostring(L, -1));
    lua_pushvalue(L, 3);
    return 2; /* [loader, filename] */
}

/* Puts the searcher second in package.searchers, or refreshes it when ws is
 * opened again (ws.so required twice), so there is only ever one. */
static void install_searcher(lua_State *L)
{
    int base = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    if (lua_getfield(L, -1, LUA_LOADLIBNAME) != LUA_TTABLE || /* [loaded, package] */
        lua_getfield(L, -1, "searchers") != LUA_TTABLE ||
        lua_getfield(L, -2, "searchpath") != LUA_TFUNCTION) {
        lua_settop(L, base); /* no package library: nothing to search with */
        return;
    }
    /* [loaded, package, searchers, searchpath] */
    push_user_template(L);
    push_lib_template(L);
    lua_pushcclosure(L, ws_searcher, 3); /* [loaded, package, searchers, searcher] */
    lua_Integer n = (lua_Integer)lua_rawlen(L, -2), at = 0;
    for (lua_Integer i = 1; i <= n && !at; i++) {
        if (lua_rawgeti(L, -2, i) == LUA_TFUNCTION && lua_tocfunction(L, -1) == ws_searcher) at = i;
        lua_pop(L, 1);
    }
    if (!at) {
        at = n >= 1 ? 2 : 1;
        for (lua_Integer i = n; i >= at; i--) {
            lua_rawgeti(L, -2, i);
            lua_rawseti(L, -3, i + 1);
        }
    }
    lua_rawseti(L, -2, at);
    lua_settop(L, base);
}

static const luaL_Reg ws_funcs[] = {
    {"log", l_log},
    {"now_ms", l_now_ms},
    {"host_memory", l_host_memory},
    {"interrupted", l_interrupted},
    {"reference_copy", l_reference_copy},
    {"isatty", l_isatty},
    {"mkdir", l_mkdir},
    {"reference_read", l_reference_read},
    {"pid", l_pid},
    {NULL, NULL},
};

int luaopen_ws(lua_State *L)
{
    lua_newtable(L); /* [ws] */
    ws_open_device(L);
    ws_open_tensor(L);
    ws_open_pool(L);
    ws_open_comm(L);
    ws_open_plan(L);
    ws_open_safetensors(L);
    ws_open_save(L);
    ws_open_quant(L);
    ws_open_sender(L);
    luaL_setfuncs(L, ws_funcs, 0);
    lua_pushliteral(L, WSHOST_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushinteger(L, (lua_Integer)WS_PLAN_DEFAULT_BUCKET_BYTES);
    lua_setfield(L, -2, "DEFAULT_BUCKET_BYTES");
    install_searcher(L);
    return 1; /* [ws] */
}
