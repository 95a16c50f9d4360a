/* bind_save.c: ws.save_safetensors and ws.save_checkpoint, the Lua face of
 * the safetensors writer (core/safetensors_write.h).
 *
 *   ws.save_safetensors(path, names, tensors [, opts]) -> true | nil, msg, code
 *   ws.save_checkpoint(dir, names, tensors [, opts])   -> true, files | nil, msg, code
 *
 * names[i] is the name tensors[i] is saved under (its own name is not used).
 * opts: metadata = {key = "value"} (strings; saved sorted by key), staging_mb
 * = host staging buffer for device tensors in MiB (default 64), progress =
 * function(bytes_done, bytes_total) called as data is written (an error it
 * raises stops the save and is raised again once the temporary file is
 * gone); save_checkpoint also takes prefix = "model" and max_shard_bytes
 * (default 5e9, Hugging Face's "5GB"). `files` lists the paths written,
 * dir .. "/" .. name: the shards in order, then the index when there is one.
 * Environment failures (io, nomem, device) return nil, msg, code; misuse
 * raises, and so does Ctrl-C (the save stops between chunks). An error raised
 * by progress, at its final call too, fails the save: it is raised again and
 * the file being written is removed (shards already complete stay, without
 * an index). A tensor freed or put to sleep by progress raises, naming it.
 * Strings with an embedded NUL (path, names, metadata, prefix) raise.
 *
 * The progress function may change the tables it was given: every string
 * and tensor the core points into is anchored in a private table on the
 * stack for the length of the call, so none is collected under it. */
#include <stdlib.h>
#include <string.h>

#include "bind.h"
#include "safetensors_write.h"

typedef struct save_args {
    int anchor; /* stack index of the private table keeping strings and tensors alive */
    lua_Integer n_anchored;
    size_t n;
    const char **names;
    ws_tensor **tensors;
    size_t n_meta;
    const char **meta_kv;
    size_t staging_bytes;
    int progress_idx; /* 0: none */
} save_args;

static int cmp_pair(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Keeps the value on top of the stack alive for the call (pops it). */
static void anchor(lua_State *L, save_args *a)
{
    lua_rawseti(L, a->anchor, ++a->n_anchored);
}

/* The string at idx, which must be one; NULL when it holds a NUL byte, which
 * C would take for its end (saving "w\0x" as "w"). */
static const char *whole_string(lua_State *L, int idx)
{
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    return strlen(s) == len ? s : NULL;
}

/* A path argument (1: the file or directory), checked for a NUL byte. */
static const char *check_path(lua_State *L, int idx, const char *fname, const char *what)
{
    luaL_checkstring(L, idx);
    const char *s = whole_string(L, idx);
    if (!s)
        luaL_error(L, "%s: %s contains a NUL byte (after '%s'); remove it", fname, what,
                   lua_tostring(L, idx));
    return s;
}

/* Reads names (idx) and tensors (idx + 1): same length, strings and live
 * tensors. Arrays live in userdata left on the stack (no leak on a raise);
 * the strings and tensors they point to are anchored. */
static void read_lists(lua_State *L, int idx, const char *fname, save_args *a)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    a->tensors = ws_lua_check_tensor_list(L, idx + 1, &a->n); /* [..., tlist] */
    for (size_t i = 0; i < a->n; i++) { /* the same userdata the list points into */
        lua_rawgeti(L, idx + 1, (lua_Integer)i + 1);
        anchor(L, a);
    }
    size_t n_names = (size_t)lua_rawlen(L, idx);
    if (n_names != a->n)
        luaL_error(L, "%s: %d names for %d tensors; give one name per tensor", fname,
                   (int)n_names, (int)a->n);
    a->names = (const char **)lua_newuserdatauv(L, (a->n ? a->n : 1) * sizeof *a->names, 0);
    for (size_t i = 0; i < a->n; i++) {
        if (lua_rawgeti(L, idx, (lua_Integer)i + 1) != LUA_TSTRING)
            luaL_error(L, "%s: names[%d] must be a string, got %s", fname, (int)i + 1,
                       luaL_typename(L, -1));
        a->names[i] = whole_string(L, -1);
        if (!a->names[i])
            luaL_error(L, "%s: names[%d] contains a NUL byte (after '%s'); tensor names "
                       "cannot hold one", fname, (int)i + 1, lua_tostring(L, -1));
        anchor(L, a);
    }
}

/* Reads the options common to both functions from the table at opts (0: none). */
static void read_common_opts(lua_State *L, int opts, const char *fname, save_args *a)
{
    a->n_meta = 0;
    a->meta_kv = NULL;
    a->staging_bytes = 0;
    a->progress_idx = 0;
    if (!opts) return;
    if (lua_getfield(L, opts, "metadata") != LUA_TNIL) { /* stays: keeps the strings */
        if (!lua_istable(L, -1))
            luaL_error(L, "%s: metadata must be a table of strings, got %s", fname,
                       luaL_typename(L, -1));
        int meta = lua_gettop(L);
        size_t m = 0;
        for (lua_pushnil(L); lua_next(L, meta); lua_pop(L, 1)) m++;
        a->meta_kv = (const char **)lua_newuserdatauv(L, (m ? 2 * m : 1) * sizeof(char *), 0);
        lua_pushnil(L);
        while (lua_next(L, meta)) { /* [..., meta, kv, key, value] */
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "%s: metadata keys must be strings, got a %s key", fname,
                           luaL_typename(L, -2));
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "%s: metadata['%s'] must be a string, got %s (use tostring)",
                           fname, lua_tostring(L, -2), luaL_typename(L, -1));
            const char *k = whole_string(L, -2), *v = whole_string(L, -1);
            if (!k)
                luaL_error(L, "%s: metadata key '%s' contains a NUL byte; remove it", fname,
                           lua_tostring(L, -2));
            if (!v)
                luaL_error(L, "%s: metadata['%s'] contains a NUL byte (after '%s'); remove it",
                           fname, k, lua_tostring(L, -1));
            a->meta_kv[2 * a->n_meta] = k;
            a->meta_kv[2 * a->n_meta + 1] = v;
            a->n_meta++;
            anchor(L, a); /* the value; [..., meta, kv, key] */
            lua_pushvalue(L, -1);
            anchor(L, a); /* the key, kept for lua_next as well */
        }
        /* Sorted, so the same metadata gives the same bytes whatever Lua's table order. */
        qsort(a->meta_kv, a->n_meta, 2 * sizeof(char *), cmp_pair);
    } else {
        lua_pop(L, 1);
    }
    if (lua_getfield(L, opts, "staging_mb") != LUA_TNIL) {
        lua_Number mb = lua_tonumber(L, -1);
        if (!lua_isnumber(L, -1) || !(mb > 0) || mb > 1048576)
            luaL_error(L, "%s: staging_mb must be a number of MiB > 0, got %s", fname,
                       luaL_tolstring(L, -1, NULL));
        a->staging_bytes = (size_t)(mb * 1048576.0);
        if (!a->staging_bytes) a->staging_bytes = 1;
    }
    lua_pop(L, 1);
    if (lua_getfield(L, opts, "progress") != LUA_TNIL) {
        if (!lua_isfunction(L, -1))
            luaL_error(L, "%s: progress must be a function(bytes_done, bytes_total), got %s",
                       fname, luaL_typename(L, -1));
        a->progress_idx = lua_gettop(L); /* stays on the stack, out of the callback's reach */
    } else {
        lua_pop(L, 1);
    }
}

/* The progress callback the core calls between chunks. A Lua error cannot
 * unwind through the core (it holds a file and buffers), so it is caught,
 * left on the stack, and raised once the core has cleaned up. */
typedef struct progress_ctx {
    lua_State *L;
    int fn;         /* stack index of the Lua function, 0: none */
    int failed;     /* the function raised; its error is on top of the stack */
    int interrupted;
} progress_ctx;

static int on_progress(uint64_t done, uint64_t total, void *p)
{
    progress_ctx *c = p;
    if (c->failed || c->interrupted) return 1;
    if (ws_lua_is_interrupted()) {
        c->interrupted = 1;
        return 1;
    }
    if (!c->fn) return 0;
    lua_pushvalue(c->L, c->fn);
    lua_pushinteger(c->L, (lua_Integer)done);
    lua_pushinteger(c->L, (lua_Integer)total);
    if (lua_pcall(c->L, 2, 0, 0) != LUA_OK) {
        c->failed = 1;
        return 1;
    }
    return 0;
}

/* The core's status as Lua results: raises for a failed progress function,
 * Ctrl-C and misuse; nil, msg, code for the environment. 0: success. A
 * failed progress function is raised whatever the status: the core stops at
 * its failure, so the save did not complete. */
static int finish(lua_State *L, ws_status rc, const progress_ctx *c, const char *fname)
{
    if (c->failed) return lua_error(L); /* the progress function's own error */
    if (c->interrupted) return luaL_error(L, "%s: interrupted!", fname);
    if (rc == WS_OK) return 0;
    return ws_lua_fail(L, rc, fname);
}

static int opts_index(lua_State *L, int idx, const char *const *keys, const char *fname)
{
    if (lua_isnoneornil(L, idx)) return 0;
    luaL_checktype(L, idx, LUA_TTABLE);
    ws_lua_check_options(L, idx, keys, fname);
    return idx;
}

static const char *const save_keys[] = {"metadata", "staging_mb", "progress", NULL};
static const char *const checkpoint_keys[] = {"metadata", "staging_mb", "progress", "prefix",
                                              "max_shard_bytes", NULL};

/* Pushes the anchor table and starts a; [..., anchor] */
static void start_args(lua_State *L, save_args *a)
{
    lua_newtable(L);
    a->anchor = lua_gettop(L);
    a->n_anchored = 0;
}

static int l_save_safetensors(lua_State *L)
{
    const char *fname = "save_safetensors";
    const char *path = check_path(L, 1, fname, "path"); /* argument 1 stays on the stack */
    int opts = opts_index(L, 4, save_keys, fname);
    lua_settop(L, 4);
    save_args a;
    start_args(L, &a);
    read_lists(L, 2, fname, &a);
    read_common_opts(L, opts, fname, &a);
    progress_ctx c = {L, a.progress_idx, 0, 0};
    ws_status rc = ws_st_write(path, a.n, a.names, (const ws_tensor *const *)a.tensors, a.n_meta,
                               a.meta_kv, a.staging_bytes, on_progress, &c);
    int failed = finish(L, rc, &c, fname);
    if (failed) return failed; /* nil, msg, code */
    lua_pushboolean(L, 1);
    return 1;
}

static int l_save_checkpoint(lua_State *L)
{
    const char *fname = "save_checkpoint";
    const char *dir = check_path(L, 1, fname, "directory");
    int opts = opts_index(L, 4, checkpoint_keys, fname);
    lua_settop(L, 4);
    save_args a;
    start_args(L, &a);
    read_lists(L, 2, fname, &a);
    read_common_opts(L, opts, fname, &a);
    const char *prefix = "model";
    lua_Integer max_shard = 0;
    if (opts) {
        if (lua_getfield(L, opts, "prefix") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TSTRING)
                return luaL_error(L, "%s: prefix must be a string, got %s", fname,
                                  luaL_typename(L, -1));
            prefix = whole_string(L, -1);
            if (!prefix)
                return luaL_error(L, "%s: prefix contains a NUL byte (after '%s'); remove it",
                                  fname, lua_tostring(L, -1));
            anchor(L, &a);
        } else {
            lua_pop(L, 1);
        }
        if (lua_getfield(L, opts, "max_shard_bytes") != LUA_TNIL) {
            int isint = 0;
            max_shard = lua_tointegerx(L, -1, &isint);
            if (!isint || max_shard <= 0)
                return luaL_error(L, "%s: max_shard_bytes must be an integer > 0, got %s", fname,
                                  luaL_tolstring(L, -1, NULL));
        }
        lua_pop(L, 1);
    }
    progress_ctx c = {L, a.progress_idx, 0, 0};
    size_t n_shards = 0;
    ws_status rc = ws_st_save_sharded(dir, prefix, a.n, a.names,
                                      (const ws_tensor *const *)a.tensors, (uint64_t)max_shard,
                                      a.n_meta, a.meta_kv, a.staging_bytes, on_progress, &c,
                                      &n_shards);
    int failed = finish(L, rc, &c, fname);
    if (failed) return failed; /* nil, msg, code */
    lua_pushboolean(L, 1);
    lua_createtable(L, (int)n_shards + (n_shards > 1), 0); /* [..., true, files] */
    char file[4096]; /* the core refused a prefix whose names would not fit a file name */
    const char *sep = dir[strlen(dir) - 1] == '/' ? "" : "/";
    for (size_t s = 0; s < n_shards; s++) {
        ws_st_shard_filename(file, sizeof file, prefix, s, n_shards);
        lua_pushfstring(L, "%s%s%s", dir, sep, file);
        lua_rawseti(L, -2, (lua_Integer)s + 1);
    }
    if (n_shards > 1) {
        ws_st_index_filename(file, sizeof file, prefix);
        lua_pushfstring(L, "%s%s%s", dir, sep, file);
        lua_rawseti(L, -2, (lua_Integer)n_shards + 1);
    }
    return 2;
}

/* The prefix argument at idx (default "model"), checked for a NUL byte. */
static const char *opt_prefix(lua_State *L, int idx, const char *fname)
{
    if (lua_isnoneornil(L, idx)) return "model";
    luaL_checktype(L, idx, LUA_TSTRING);
    const char *p = whole_string(L, idx);
    if (!p) luaL_error(L, "%s: the prefix holds a NUL byte", fname);
    return p;
}

/* Reads the list at idx of n non-negative integers (Lua's 1-based when
 * one_based) into a userdata array pushed on the stack. */
static size_t *read_counts(lua_State *L, int idx, size_t n, int one_based, const char *fname,
                           const char *what)
{
    size_t *out = (size_t *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *out, 0);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int ok;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < one_based)
            luaL_error(L, "%s: %s[%d] must be an integer >= %d, got %s", fname, what, (int)i + 1,
                       one_based, luaL_tolstring(L, -1, NULL));
        out[i] = (size_t)(v - one_based);
        lua_pop(L, 1);
    }
    return out;
}

/* ws.shard_split(sizes, max_shard_bytes [, prefix]) -> shards, files:
 * save_pretrained's split of tensors of sizes[i] bytes (ws_st_shard_split):
 * shards[i] is tensor i's shard (1-based), files the shards' file names. */
static int l_shard_split(lua_State *L)
{
    const char *fname = "shard_split";
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer max = luaL_checkinteger(L, 2);
    luaL_argcheck(L, max > 0, 2, "max_shard_bytes must be > 0");
    const char *prefix = opt_prefix(L, 3, fname);
    size_t n = (size_t)lua_rawlen(L, 1);
    size_t *bytes = read_counts(L, 1, n, 0, fname, "sizes"); /* [.., bytes] */
    size_t *shard_of = (size_t *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *shard_of, 0);
    uint64_t *b64 = (uint64_t *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *b64, 0);
    for (size_t i = 0; i < n; i++) b64[i] = bytes[i];
    size_t n_shards = ws_st_shard_split(n, b64, (uint64_t)max, shard_of);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushinteger(L, (lua_Integer)shard_of[i] + 1);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_createtable(L, (int)n_shards, 0);
    for (size_t k = 0; k < n_shards; k++) {
        int len = ws_st_shard_filename(NULL, 0, prefix, k, n_shards);
        luaL_Buffer b;
        char *name = luaL_buffinitsize(L, &b, (size_t)len + 1);
        ws_st_shard_filename(name, (size_t)len + 1, prefix, k, n_shards);
        luaL_pushresultsize(&b, (size_t)len);
        lua_rawseti(L, -2, (lua_Integer)k + 1);
    }
    return 2;
}

/* ws.save_index(dir, names, shards, total_bytes [, prefix]) -> true | nil,
 * msg, code: the index of a split made by ws.shard_split (shards 1-based). */
static int l_save_index(lua_State *L)
{
    const char *fname = "save_index";
    const char *dir = check_path(L, 1, fname, "directory");
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer total = luaL_checkinteger(L, 4);
    luaL_argcheck(L, total >= 0, 4, "total_bytes must be >= 0");
    const char *prefix = opt_prefix(L, 5, fname);
    lua_settop(L, 5);
    size_t n = (size_t)lua_rawlen(L, 2);
    if ((size_t)lua_rawlen(L, 3) != n)
        return luaL_error(L, "%s: %d names but %d shard numbers", fname, (int)n,
                          (int)lua_rawlen(L, 3));
    const char **names = (const char **)lua_newuserdatauv(L, (n ? n : 1) * sizeof *names, 0);
    size_t n_shards = 1;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 2, (lua_Integer)i + 1); /* the names table keeps the string */
        if (lua_type(L, -1) != LUA_TSTRING || !(names[i] = whole_string(L, -1)))
            return luaL_error(L, "%s: names[%d] must be a string without NUL bytes", fname,
                              (int)i + 1);
        lua_pop(L, 1);
    }
    size_t *shard_of = read_counts(L, 3, n, 1, fname, "shards");
    for (size_t i = 0; i < n; i++)
        if (shard_of[i] + 1 > n_shards) n_shards = shard_of[i] + 1;
    ws_status rc = ws_st_save_index(dir, prefix, n, names, shard_of, n_shards, (uint64_t)total);
    if (rc != WS_OK) return ws_lua_fail(L, rc, fname);
    lua_pushboolean(L, 1);
    return 1;
}

/* ws.write_text(path, text) -> true | nil, msg, code: the file written
 * atomically (a temporary of its own, synced, renamed). */
static int l_write_text(lua_State *L)
{
    const char *path = check_path(L, 1, "write_text", "path");
    luaL_checktype(L, 2, LUA_TSTRING);
    const char *text = whole_string(L, 2);
    if (!text) return luaL_error(L, "write_text: the text holds a NUL byte");
    ws_status rc = ws_st_write_text(path, text);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "write_text");
    lua_pushboolean(L, 1);
    return 1;
}

static const luaL_Reg save_funcs[] = {
    {"save_safetensors", l_save_safetensors},
    {"save_checkpoint", l_save_checkpoint},
    {"shard_split", l_shard_split},
    {"save_index", l_save_index},
    {"write_text", l_write_text},
    {NULL, NULL},
};

void ws_open_save(lua_State *L)
{
    /* [ws] */
    luaL_setfuncs(L, save_funcs, 0);
}
