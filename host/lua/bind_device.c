/* bind_device.c: the Lua face of devices and timing events (ws.device,
 * ws.devices, ws.default_device, ws.Device, ws.Event) and the choice of the
 * default device.
 *
 * Devices live for the whole process (core registry), so a ws.Device userdata
 * only holds a pointer. One userdata per device is cached in the registry so
 * `ws.device("cpu") == ws.device("cpu")`. The default device is resolved
 * lazily on first use: probing CUDA costs milliseconds and `wshost -e ''`
 * must stay fast. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bind.h"
#include "env.h"
#include "parallel.h"

#define DEVICE_CACHE "ws.Device.cache"

typedef struct ldevice {
    ws_device *d;
} ldevice;

typedef struct levent {
    ws_device *d;
    ws_event *e;
    int recorded;
} levent;

static ws_device *default_dev;
static char default_why[200];

void ws_lua_set_default_device(ws_device *d, const char *why)
{
    default_dev = d;
    snprintf(default_why, sizeof default_why, "%s", why ? why : "");
}

/* "cpu", "cuda", "cuda:N"; anything else is a typo, not a missing device. */
static int valid_device_name(const char *s)
{
    if (strcmp(s, "cpu") == 0 || strcmp(s, "cuda") == 0) return 1;
    if (strncmp(s, "cuda:", 5) != 0 || !s[5]) return 0;
    for (const char *p = s + 5; *p; p++)
        if (*p < '0' || *p > '9') return 0;
    return 1;
}

static int env_ignored(lua_State *L)
{
    /* lua.c's -E sets this registry field; wshost -E does the same. */
    int ignored = lua_getfield(L, LUA_REGISTRYINDEX, "LUA_NOENV") != LUA_TNIL &&
                  lua_toboolean(L, -1);
    lua_pop(L, 1);
    return ignored;
}

ws_device *ws_lua_default_device(lua_State *L)
{
    if (default_dev) return default_dev;
    const char *env = env_ignored(L) ? NULL : ws_env_get("WSHOST_DEVICE");
    if (env && *env) {
        ws_device *d;
        if (!valid_device_name(env))
            luaL_error(L, "WSHOST_DEVICE=%s: unknown device (valid: cpu, cuda, cuda:N)", env);
        if (ws_device_get(env, &d) != WS_OK)
            luaL_error(L, "WSHOST_DEVICE=%s: %s", env, ws_errmsg());
        ws_lua_set_default_device(d, "WSHOST_DEVICE");
        return d;
    }
    const char *why = NULL;
    ws_device *d = ws_device_default(&why);
    ws_lua_set_default_device(d, why);
    return d;
}

/* A relative index is a `device` option read from an options table, not an
 * argument: "bad argument #-1" would say nothing, so name the option. */
static int device_error(lua_State *L, int idx, const char *msg)
{
    if (idx > 0) return luaL_argerror(L, idx, msg);
    lua_Debug ar;
    const char *fname = "?";
    if (lua_getstack(L, 0, &ar) && lua_getinfo(L, "n", &ar) && ar.name) fname = ar.name;
    return luaL_error(L, "bad option 'device' to '%s' (%s)", fname, msg);
}

ws_status ws_lua_to_device(lua_State *L, int idx, ws_device **out)
{
    ldevice *ld = (ldevice *)luaL_testudata(L, idx, WS_DEVICE_MT);
    if (ld) {
        *out = ld->d;
        return WS_OK;
    }
    if (lua_type(L, idx) != LUA_TSTRING)
        device_error(L, idx,
                     lua_pushfstring(L, "ws.Device or device name expected, got %s",
                                     luaL_typename(L, idx)));
    const char *name = lua_tostring(L, idx);
    if (!valid_device_name(name))
        device_error(L, idx,
                     lua_pushfstring(L, "unknown device '%s' (valid: cpu, cuda, cuda:N)", name));
    return ws_device_get(name, out);
}

void ws_lua_push_device(lua_State *L, ws_device *d)
{
    lua_getfield(L, LUA_REGISTRYINDEX, DEVICE_CACHE); /* [cache] */
    if (lua_rawgetp(L, -1, d) == LUA_TNIL) {          /* [cache, nil] */
        lua_pop(L, 1);
        ldevice *ld = (ldevice *)lua_newuserdatauv(L, sizeof *ld, 0);
        ld->d = d;
        luaL_setmetatable(L, WS_DEVICE_MT);
        lua_pushvalue(L, -1);
        lua_rawsetp(L, -3, d); /* [cache, dev] */
    }
    lua_remove(L, -2); /* [dev] */
}

static ws_device *check_dev(lua_State *L, int idx)
{
    return ((ldevice *)luaL_checkudata(L, idx, WS_DEVICE_MT))->d;
}

/* ws.device(name) -> dev | nil, msg, "device" */
static int l_device(lua_State *L)
{
    ws_device *d;
    ws_status rc = ws_lua_to_device(L, 1, &d);
    if (rc != WS_OK) return ws_lua_fail(L, rc, NULL);
    ws_lua_push_device(L, d);
    return 1;
}

static int l_devices(lua_State *L)
{
    int n = ws_device_cuda_count();
    lua_createtable(L, n + 1, 0);
    int k = 0;
    for (int i = 0; i < n; i++) {
        char name[32];
        ws_device *d;
        snprintf(name, sizeof name, "cuda:%d", i);
        if (ws_device_get(name, &d) != WS_OK) continue;
        ws_lua_push_device(L, d);
        lua_rawseti(L, -2, ++k);
    }
    ws_lua_push_device(L, ws_device_cpu());
    lua_rawseti(L, -2, ++k);
    return 1;
}

static int l_default_device(lua_State *L)
{
    ws_lua_push_device(L, ws_lua_default_device(L));
    lua_pushstring(L, default_why);
    return 2;
}

static int dev_index(lua_State *L)
{
    ws_device *d = check_dev(L, 1);
    const char *key = luaL_checkstring(L, 2);
    if (strcmp(key, "name") == 0)
        lua_pushstring(L, d->name);
    else if (strcmp(key, "kind") == 0)
        lua_pushstring(L, d->kind == WS_DEVICE_CUDA ? "cuda" : "cpu");
    else if (strcmp(key, "index") == 0)
        lua_pushinteger(L, d->index);
    else if (strcmp(key, "description") == 0)
        lua_pushstring(L, d->description);
    else {
        /* methods live in the upvalue table */
        lua_pushvalue(L, 2);
        lua_rawget(L, lua_upvalueindex(1));
    }
    return 1;
}

static int dev_tostring(lua_State *L)
{
    ws_device *d = check_dev(L, 1);
    lua_pushfstring(L, "ws.Device(%s '%s')", d->name, d->description);
    return 1;
}

static int dev_memory(lua_State *L)
{
    ws_mem_info mi;
    if (ws_device_mem_info(check_dev(L, 1), &mi) != WS_OK) return ws_lua_raise(L, "memory");
    ws_lua_int_field fields[] = {{"total", (lua_Integer)mi.total},
                                 {"free", (lua_Integer)mi.free},
                                 {"held", (lua_Integer)mi.held},
                                 {"peak", (lua_Integer)mi.peak}};
    ws_lua_push_int_fields(L, fields, 4, 0);
    return 1;
}

static int dev_reset_peak(lua_State *L)
{
    ws_device_reset_peak(check_dev(L, 1));
    return 0;
}

static int dev_synchronize(lua_State *L)
{
    if (ws_device_synchronize(check_dev(L, 1)) != WS_OK) return ws_lua_raise(L, "synchronize");
    return 0;
}

static int dev_event(lua_State *L)
{
    ws_device *d = check_dev(L, 1);
    /* Released state first, so a failed create leaves nothing to free. */
    levent *ev = (levent *)lua_newuserdatauv(L, sizeof *ev, 0);
    ev->d = d;
    ev->e = NULL;
    ev->recorded = 0;
    luaL_setmetatable(L, WS_EVENT_MT);
    if (d->ops->event_create(d, &ev->e) != WS_OK) return ws_lua_raise(L, "event");
    return 1;
}

static levent *check_event(lua_State *L, int idx)
{
    levent *ev = (levent *)luaL_checkudata(L, idx, WS_EVENT_MT);
    /* Only a finalized event is gone (it has no free()): reachable from
     * another object's __gc. */
    if (!ev->e)
        luaL_argerror(L, idx, lua_pushfstring(L, "event of %s was collected; make another "
                                                 "with dev:event()",
                                              ev->d->name));
    return ev;
}

static int ev_record(lua_State *L)
{
    levent *ev = check_event(L, 1);
    if (ev->d->ops->event_record(ev->d, ev->e) != WS_OK) return ws_lua_raise(L, "record");
    ev->recorded = 1;
    lua_settop(L, 1);
    return 1;
}

static int ev_elapsed_ms(lua_State *L)
{
    levent *a = check_event(L, 1), *b = check_event(L, 2);
    if (a->d != b->d)
        return luaL_argerror(L, 2, lua_pushfstring(L, "events of different devices (%s, %s)",
                                                   a->d->name, b->d->name));
    if (!a->recorded || !b->recorded)
        return luaL_error(L, "elapsed_ms: both events must be recorded first (ev:record())");
    double ms = 0;
    if (a->d->ops->event_elapsed_ms(a->d, a->e, b->e, &ms) != WS_OK)
        return ws_lua_raise(L, "elapsed_ms");
    lua_pushnumber(L, ms);
    return 1;
}

static int ev_gc(lua_State *L)
{
    levent *ev = (levent *)luaL_checkudata(L, 1, WS_EVENT_MT);
    ws_event *e = ev->e;
    ev->e = NULL;
    if (e) ev->d->ops->event_destroy(ev->d, e);
    return 0;
}

static int ev_tostring(lua_State *L)
{
    levent *ev = (levent *)luaL_checkudata(L, 1, WS_EVENT_MT);
    lua_pushfstring(L, "ws.Event(%s%s)", ev->d->name, ev->recorded ? " recorded" : "");
    return 1;
}

static const luaL_Reg dev_methods[] = {
    {"memory", dev_memory},
    {"reset_peak", dev_reset_peak},
    {"synchronize", dev_synchronize},
    {"event", dev_event},
    {NULL, NULL},
};

static const luaL_Reg ev_methods[] = {
    {"record", ev_record},
    {"elapsed_ms", ev_elapsed_ms},
    {NULL, NULL},
};

static const luaL_Reg dev_meta[] = {
    {"__tostring", dev_tostring},
    {NULL, NULL},
};

static const luaL_Reg ev_meta[] = {
    {"__gc", ev_gc},
    {"__tostring", ev_tostring},
    {NULL, NULL},
};

static const luaL_Reg ws_funcs[] = {
    {"device", l_device},
    {"devices", l_devices},
    {"default_device", l_default_device},
    {NULL, NULL},
};

void ws_open_device(lua_State *L)
{
    /* [ws] */
    /* The cpu device's thread count comes from the environment: a value it
     * cannot use stops the program here, at startup, not silently later. */
    if (ws_parallel_check_env() != WS_OK) ws_lua_raise(L, NULL);
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, DEVICE_CACHE);

    ws_lua_new_type(L, WS_DEVICE_MT, dev_methods, dev_meta, dev_index);
    ws_lua_new_type(L, WS_EVENT_MT, ev_methods, ev_meta, NULL);
    luaL_setfuncs(L, ws_funcs, 0); /* [ws] */
}
