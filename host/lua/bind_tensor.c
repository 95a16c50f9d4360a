/* bind_tensor.c: the Lua face of tensors (ws.tensor, ws.Tensor methods and the
 * batched ws.pack / ws.unpack / ws.copy_many).
 *
 * A tensor userdata embeds the core ws_tensor (bind.h). User value 1 keeps
 * alive what the tensor depends on (the base of a view, the pool it was carved
 * from); user value 2 holds its label once freed, so misuse after free() still
 * names it. __gc, __close and :free() share one idempotent release. Lua
 * indices are 1-based; the core is 0-based, so translation happens here. */
#include <float.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "bind.h"

/* ---- helpers ------------------------------------------------------------- */

static const char *label(const ws_tensor *t, char *buf, size_t n)
{
    return ws_tensor_label(t, buf, n);
}

/* The one release behind __gc, __close and :free(). */
static void release(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    ws_ltensor *lt = ws_lua_check_ltensor(L, idx);
    if (ws_tensor_is_released(&lt->t)) return;
    char buf[256];
    lua_pushstring(L, label(&lt->t, buf, sizeof buf));
    lua_setiuservalue(L, idx, 2);
    ws_tensor_free(&lt->t);
    lua_pushnil(L); /* drop the reference to the base or pool */
    lua_setiuservalue(L, idx, 1);
}

static int t_free(lua_State *L)
{
    release(L, 1);
    return 0;
}

int ws_lua_read_shape(lua_State *L, int idx, const char *what, int64_t *shape, int allow_infer,
                      int *infer)
{
    idx = lua_absindex(L, idx);
    if (!lua_istable(L, idx))
        return luaL_error(L, "%s: shape must be a table of integers, got %s", what,
                          luaL_typename(L, idx));
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
    if (n > WS_MAX_DIMS)
        return luaL_error(L, "%s: shape has %d dimensions, at most %d are supported", what,
                          (int)n, WS_MAX_DIMS);
    *infer = -1;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i); /* [..., dim] */
        int isint = 0;
        lua_Integer v = lua_tointegerx(L, -1, &isint);
        if (!isint)
            return luaL_error(L, "%s: shape[%d] must be an integer, got %s", what, (int)i,
                              luaL_typename(L, -1));
        lua_pop(L, 1);
        if (v == -1 && allow_infer && *infer < 0) {
            *infer = (int)i - 1;
        } else if (v < 0) {
            return luaL_error(L, "%s: shape[%d] = %d: dimensions must be >= 0%s", what, (int)i,
                              (int)v, allow_infer ? " (one -1 may be inferred)" : "");
        }
        shape[i - 1] = (int64_t)v;
    }
    return (int)n;
}

ws_dtype ws_lua_check_dtype(lua_State *L, int idx, const char *what)
{
    ws_dtype dt;
    if (lua_type(L, idx) != LUA_TSTRING)
        luaL_error(L, "%s: dtype must be a string such as \"bf16\", got %s", what,
                   luaL_typename(L, idx));
    const char *name = lua_tostring(L, idx);
    if (ws_dtype_parse(name, &dt) != 0)
        luaL_error(L, "%s: unknown dtype '%s' (valid: f32 bf16 f16 fp8 u8 i32 i64, or long names "
                      "such as float32 bfloat16 float16 float8_e4m3fn uint8 int32 int64)",
                   what, name);
    return dt;
}

/* Pushes a new tensor userdata for a view of the tensor at base_idx. */
static ws_ltensor *new_view(lua_State *L, int base_idx)
{
    base_idx = lua_absindex(L, base_idx);
    ws_ltensor *lt = ws_lua_new_tensor(L); /* [..., view] */
    /* The core storage keeps the bytes alive; what the Lua side must keep is
     * the base's pool (its user value 1, or nil), so the view holds the pool
     * directly: freeing the base must not let the pool go while the view
     * still uses its memory. */
    lua_getiuservalue(L, base_idx, 1);
    lua_setiuservalue(L, -2, 1);
    return lt;
}

/* ---- construction --------------------------------------------------------- */

static const char *const tensor_keys[] = {"shape", "dtype", "device", "name", "pinned", "pool",
                                          "fill", NULL};
static const char *const pool_tensor_keys[] = {"shape", "dtype", "name", "fill", NULL};

/* The fill value at idx as a double. Fills travel as doubles; an i64 fill
 * with a Lua integer a double cannot hold (beyond 2^53) would store a
 * neighbouring value, so it raises instead (set() is exact). Range and
 * integrality against the dtype are the core's check (ws_tensor_fill). */
static double fill_value(lua_State *L, int idx, ws_dtype dtype, const char *what)
{
    double v = lua_tonumber(L, idx);
    if (dtype == WS_I64 && lua_isinteger(L, idx)) {
        lua_Integer i = lua_tointeger(L, idx);
        if (v >= 9223372036854775808.0 || (lua_Integer)v != i)
            luaL_error(L, "%s: value %I cannot be filled exactly into i64: fill takes the "
                       "integers a double holds (all up to 2^53); set() stores any i64", what, i);
    }
    return v;
}

int ws_lua_tensor_from_opts(lua_State *L, int opts, ws_pool *pool, int pool_idx,
                            const char *fname)
{
    opts = lua_absindex(L, opts);
    if (pool_idx) pool_idx = lua_absindex(L, pool_idx);
    luaL_checktype(L, opts, LUA_TTABLE);
    ws_lua_check_options(L, opts, pool ? pool_tensor_keys : tensor_keys, fname);

    int64_t shape[WS_MAX_DIMS];
    int infer;
    if (lua_getfield(L, opts, "shape") == LUA_TNIL)
        return luaL_error(L, "%s: shape is required, e.g. {shape={2,3}}", fname);
    int ndim = ws_lua_read_shape(L, -1, fname, shape, 0, &infer);
    lua_pop(L, 1);

    ws_dtype dtype = WS_F32;
    if (lua_getfield(L, opts, "dtype") != LUA_TNIL) dtype = ws_lua_check_dtype(L, -1, fname);
    lua_pop(L, 1);

    ws_tensor_opts o;
    memset(&o, 0, sizeof o);
    if (lua_getfield(L, opts, "name") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "%s: name must be a string, got %s", fname, luaL_typename(L, -1));
        o.name = lua_tostring(L, -1); /* stays valid: the options table holds it */
    }
    lua_pop(L, 1);

    int has_fill = lua_getfield(L, opts, "fill") != LUA_TNIL;
    double fill = 0;
    if (has_fill) {
        if (!lua_isnumber(L, -1))
            return luaL_error(L, "%s: fill must be a number, got %s", fname, luaL_typename(L, -1));
        fill = fill_value(L, -1, dtype, fname);
    }
    lua_pop(L, 1);

    ws_device *dev = NULL;
    if (!pool) {
        if (lua_getfield(L, opts, "pool") != LUA_TNIL) {
            if (!luaL_testudata(L, -1, WS_POOL_MT))
                return luaL_error(L, "%s: pool must be a ws.Pool, got %s", fname,
                                  luaL_typename(L, -1));
            pool = ws_lua_check_pool(L, -1);
            pool_idx = lua_gettop(L); /* stays on the stack until we return */
        } else {
            lua_pop(L, 1);
        }
    }
    if (lua_getfield(L, opts, "device") != LUA_TNIL) {
        ws_status rc = ws_lua_to_device(L, -1, &dev);
        if (rc != WS_OK) return ws_lua_fail(L, rc, fname);
    }
    lua_pop(L, 1);
    lua_getfield(L, opts, "pinned");
    o.pinned = lua_toboolean(L, -1);
    lua_pop(L, 1);

    if (pool) {
        if (o.pinned) return luaL_error(L, "%s: pinned and pool cannot be combined", fname);
        if (dev && dev != ws_pool_device(pool))
            return luaL_error(L, "%s: device %s differs from the device %s of pool '%s'", fname,
                              dev->name, ws_pool_device(pool)->name, ws_pool_tag(pool));
        o.pool = pool;
        o.device = ws_pool_device(pool);
    } else if (o.pinned) {
        /* Pinned host memory lives on the cpu but is pinned for a GPU: the
         * given GPU, else the default device, else the first usable GPU
         * (`device = "cpu", pinned = true` still pins). Without a GPU it is
         * ordinary host memory. */
        ws_device *pin = dev && dev->kind == WS_DEVICE_CUDA ? dev : ws_lua_default_device(L);
        if (pin->kind != WS_DEVICE_CUDA) pin = ws_device_default(NULL);
        o.pin_device = pin;
        o.device = ws_device_cpu();
    } else {
        o.device = dev ? dev : ws_lua_default_device(L);
    }

    ws_ltensor *lt = ws_lua_new_tensor(L); /* [..., t] released until filled */
    if (pool) {
        lua_pushvalue(L, pool_idx);
        lua_setiuservalue(L, -2, 1);
    }
    ws_status rc = ws_tensor_empty(&lt->t, dtype, ndim, shape, &o);
    if (rc != WS_OK) return ws_lua_fail(L, rc, fname);
    if (has_fill && ws_tensor_fill(&lt->t, fill) != WS_OK) {
        rc = ws_errcode();
        ws_tensor_free(&lt->t);
        return ws_lua_fail(L, rc, fname);
    }
    return 1;
}

static int l_tensor(lua_State *L)
{
    return ws_lua_tensor_from_opts(L, 1, NULL, 0, "ws.tensor");
}

/* ---- queries ---------------------------------------------------------------- */

static int t_shape(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    lua_createtable(L, t->layout.ndim, 0);
    for (int i = 0; i < t->layout.ndim; i++) {
        lua_pushinteger(L, (lua_Integer)t->layout.shape[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int t_dim(lua_State *L)
{
    lua_pushinteger(L, ws_lua_check_tensor(L, 1)->layout.ndim);
    return 1;
}

static int t_numel(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)ws_tensor_numel(ws_lua_check_tensor(L, 1)));
    return 1;
}

static int t_nbytes(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)ws_tensor_nbytes(ws_lua_check_tensor(L, 1)));
    return 1;
}

static int t_dtype(lua_State *L)
{
    lua_pushstring(L, ws_dtype_name(ws_lua_check_tensor(L, 1)->dtype));
    return 1;
}

static int t_device(lua_State *L)
{
    ws_lua_push_device(L, ws_tensor_device(ws_lua_check_tensor(L, 1)));
    return 1;
}

static int t_name(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    if (t->name)
        lua_pushstring(L, t->name);
    else
        lua_pushnil(L);
    return 1;
}

static int t_is_contiguous(lua_State *L)
{
    lua_pushboolean(L, ws_tensor_is_contiguous(ws_lua_check_tensor(L, 1)));
    return 1;
}

static int t_is_freed(lua_State *L)
{
    lua_pushboolean(L, ws_tensor_is_released(&ws_lua_check_ltensor(L, 1)->t));
    return 1;
}

static int t_tostring(lua_State *L)
{
    ws_ltensor *lt = ws_lua_check_ltensor(L, 1);
    if (ws_tensor_is_released(&lt->t)) {
        lua_getiuservalue(L, 1, 2);
        lua_pushfstring(L, "ws.Tensor(freed %s)", lua_tostring(L, -1));
        return 1;
    }
    char sh[160];
    ws_tensor_typestr(&lt->t, sh, sizeof sh);
    if (lt->t.name)
        lua_pushfstring(L, "ws.Tensor(%s %s '%s')", sh, ws_tensor_device(&lt->t)->name,
                        lt->t.name);
    else
        lua_pushfstring(L, "ws.Tensor(%s %s)", sh, ws_tensor_device(&lt->t)->name);
    return 1;
}

/* ---- views -------------------------------------------------------------------- */

static int t_narrow(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    lua_Integer dim = luaL_checkinteger(L, 2);
    lua_Integer start = luaL_checkinteger(L, 3);
    lua_Integer length = luaL_checkinteger(L, 4);
    char lb[256], sh[160];
    if (dim < 1 || dim > t->layout.ndim)
        return luaL_error(L, "narrow: dim %I out of range for tensor %s (%s has %d dims)",
                          dim, label(t, lb, sizeof lb), ws_tensor_typestr(t, sh, sizeof sh),
                          t->layout.ndim);
    int64_t size = t->layout.shape[dim - 1];
    /* Compared without adding, so huge arguments cannot overflow. */
    if (start < 1 || length < 0 || start - 1 > size || length > size - (start - 1))
        return luaL_error(L,
                          "narrow: start %I, length %I out of range for dim %I of size %I "
                          "in tensor %s (%s)",
                          start, length, dim, (lua_Integer)size, label(t, lb, sizeof lb),
                          ws_tensor_typestr(t, sh, sizeof sh));
    ws_ltensor *v = new_view(L, 1);
    if (ws_tensor_narrow(&v->t, t, (int)dim - 1, start - 1, length) != WS_OK)
        return ws_lua_raise(L, "narrow");
    return 1;
}

static int reshape_to(lua_State *L, ws_tensor *t, int ndim, int64_t *shape, int infer,
                      const char *what)
{
    char lb[256], sh[160];
    int64_t numel = ws_tensor_numel(t), known = 1;
    int has_zero = 0;
    for (int i = 0; i < ndim; i++)
        if (i != infer && shape[i] == 0) has_zero = 1;
    for (int i = 0; i < ndim && !has_zero; i++) {
        if (i == infer) continue;
        /* Huge dimensions: stop before the product overflows. */
        if (known > INT64_MAX / shape[i])
            return luaL_error(L, "%s: new shape has more elements than tensor %s (%s) has (%d)",
                              what, label(t, lb, sizeof lb), ws_tensor_typestr(t, sh, sizeof sh),
                              (int)numel);
        known *= shape[i];
    }
    if (has_zero) known = 0;
    if (infer >= 0) {
        if (known == 0 || numel % known != 0)
            return luaL_error(L, "%s: cannot infer -1 in the new shape of tensor %s (%s)", what,
                              label(t, lb, sizeof lb), ws_tensor_typestr(t, sh, sizeof sh));
        shape[infer] = numel / known;
        known = numel;
    }
    if (known != numel)
        return luaL_error(L, "%s: new shape has %d elements, tensor %s (%s) has %d", what,
                          (int)known, label(t, lb, sizeof lb), ws_tensor_typestr(t, sh, sizeof sh),
                          (int)numel);
    if (!ws_tensor_is_contiguous(t))
        return luaL_error(L, "%s: tensor %s (%s) is not contiguous; copy it first", what,
                          label(t, lb, sizeof lb), ws_tensor_typestr(t, sh, sizeof sh));
    ws_ltensor *v = new_view(L, 1);
    if (ws_tensor_reshape(&v->t, t, ndim, shape) != WS_OK) return ws_lua_raise(L, what);
    return 1;
}

static int view_as(lua_State *L, const char *what)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    int64_t shape[WS_MAX_DIMS];
    int infer;
    int ndim = ws_lua_read_shape(L, 2, what, shape, 1, &infer);
    return reshape_to(L, t, ndim, shape, infer, what);
}

static int t_view(lua_State *L) { return view_as(L, "view"); }
static int t_reshape(lua_State *L) { return view_as(L, "reshape"); }

static int t_flat(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    int64_t shape[1] = {ws_tensor_numel(t)};
    return reshape_to(L, t, 1, shape, -1, "flat");
}

static int t_bytes(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    ws_ltensor *v = new_view(L, 1);
    if (ws_tensor_flat_bytes(&v->t, t) != WS_OK) return ws_lua_raise(L, "bytes");
    return 1;
}

/* ---- data ---------------------------------------------------------------------- */

static void check_same_shape(lua_State *L, int arg, const ws_tensor *dst, const ws_tensor *src)
{
    if (ws_tensor_same_shape(dst, src)) return;
    char l1[256], l2[256], s1[160], s2[160];
    luaL_argerror(L, arg,
                  lua_pushfstring(L, "shape mismatch: dst %s is %s, src %s %s",
                                  label(dst, l1, sizeof l1), ws_tensor_typestr(dst, s1, sizeof s1),
                                  label(src, l2, sizeof l2), ws_tensor_typestr(src, s2, sizeof s2)));
}

static int t_copy_(lua_State *L)
{
    ws_tensor *dst = ws_lua_check_tensor(L, 1);
    ws_tensor *src = ws_lua_check_tensor(L, 2);
    check_same_shape(L, 2, dst, src);
    if (ws_tensor_copy(dst, src) != WS_OK) return ws_lua_raise(L, "copy_");
    lua_settop(L, 1);
    return 1;
}

static int t_fill(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    luaL_checknumber(L, 2);
    if (ws_tensor_fill(t, fill_value(L, 2, t->dtype, "fill")) != WS_OK)
        return ws_lua_raise(L, "fill");
    lua_settop(L, 1);
    return 1;
}

static int t_random_(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    lua_Integer seed = luaL_checkinteger(L, 2);
    double scale = luaL_optnumber(L, 3, 1.0);
    /* The core takes a float: a double outside its range does not convert. */
    if (!(scale >= -FLT_MAX && scale <= FLT_MAX))
        return luaL_argerror(L, 3, "scale must be a finite number within the f32 range");
    lua_Integer first = luaL_optinteger(L, 4, 0);
    if (first < 0) return luaL_argerror(L, 4, "first_index must be >= 0");
    if (ws_tensor_random(t, (uint64_t)seed, (float)scale, (uint64_t)first) != WS_OK)
        return ws_lua_raise(L, "random_");
    lua_settop(L, 1);
    return 1;
}

static int t_to(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    ws_device *dev;
    ws_status rc = ws_lua_to_device(L, 2, &dev);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "to");
    ws_dtype dt = lua_isnoneornil(L, 3) ? t->dtype : ws_lua_check_dtype(L, 3, "to");
    ws_tensor_opts o;
    memset(&o, 0, sizeof o);
    o.device = dev;
    o.name = t->name;
    ws_ltensor *out = ws_lua_new_tensor(L); /* [t, dev, dtype?, out] */
    rc = ws_tensor_empty(&out->t, dt, t->layout.ndim, t->layout.shape, &o);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "to");
    if (ws_tensor_copy(&out->t, t) != WS_OK) {
        rc = ws_errcode();
        release(L, -1);
        return ws_lua_fail(L, rc, "to");
    }
    return 1;
}

/* Translates 1-based Lua indices at [first, first+nidx) to a 0-based flat
 * row-major index. One index is already flat. */
static int64_t flat_index(lua_State *L, const ws_tensor *t, int first, int nidx, const char *what)
{
    char lb[256], sh[160];
    int64_t numel = ws_tensor_numel(t);
    if (nidx == 1) {
        lua_Integer i = luaL_checkinteger(L, first);
        if (i < 1 || i > numel)
            luaL_error(L, "%s: flat index %I out of range [1, %I] for tensor %s (%s)", what,
                       i, (lua_Integer)numel, label(t, lb, sizeof lb), ws_tensor_typestr(t, sh, sizeof sh));
        return i - 1;
    }
    if (nidx != t->layout.ndim)
        luaL_error(L, "%s: expected 1 (flat) or %d indices for tensor %s (%s), got %d", what,
                   t->layout.ndim, label(t, lb, sizeof lb), ws_tensor_typestr(t, sh, sizeof sh), nidx);
    int64_t flat = 0;
    for (int d = 0; d < nidx; d++) {
        lua_Integer i = luaL_checkinteger(L, first + d);
        if (i < 1 || i > t->layout.shape[d])
            luaL_error(L, "%s: index %d = %I out of range [1, %I] for tensor %s (%s)", what,
                       d + 1, i, (lua_Integer)t->layout.shape[d], label(t, lb, sizeof lb),
                       ws_tensor_typestr(t, sh, sizeof sh));
        flat = flat * t->layout.shape[d] + (i - 1);
    }
    return flat;
}

static int t_get(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    int64_t i = flat_index(L, t, 2, lua_gettop(L) - 1, "get");
    if (!ws_dtype_is_float(t->dtype)) { /* exact: i64 values past 2^53 survive */
        uint64_t bits;
        if (ws_tensor_get_bits(t, i, &bits) != WS_OK) return ws_lua_raise(L, "get");
        lua_Integer v = t->dtype == WS_I64 ? (lua_Integer)bits
                      : t->dtype == WS_I32 ? (lua_Integer)(int32_t)(uint32_t)bits
                                           : (lua_Integer)bits;
        lua_pushinteger(L, v);
        return 1;
    }
    double v;
    if (ws_tensor_get(t, i, &v) != WS_OK) return ws_lua_raise(L, "get");
    lua_pushnumber(L, v);
    return 1;
}

static int t_set(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    int top = lua_gettop(L);
    if (top < 3) return luaL_error(L, "set: expected index(es) and a value");
    double v = luaL_checknumber(L, top);
    int64_t i = flat_index(L, t, 2, top - 2, "set");
    ws_status rc = t->dtype == WS_I64 && lua_isinteger(L, top)
                       ? ws_tensor_set_bits(t, i, (uint64_t)lua_tointeger(L, top)) /* exact */
                       : ws_tensor_set(t, i, v);
    if (rc != WS_OK) return ws_lua_raise(L, "set");
    lua_settop(L, 1);
    return 1;
}

static int t_checksum(lua_State *L)
{
    ws_tensor *t = ws_lua_check_tensor(L, 1);
    lua_Integer first = luaL_optinteger(L, 2, 0);
    if (first < 0) return luaL_argerror(L, 2, "first_index must be >= 0");
    ws_dtype as = lua_isnoneornil(L, 3) ? t->dtype : ws_lua_check_dtype(L, 3, "checksum");
    uint64_t sum;
    if (ws_tensor_checksum(t, (uint64_t)first, as, &sum) != WS_OK)
        return ws_lua_raise(L, "checksum");
    lua_pushinteger(L, (lua_Integer)sum); /* wraps to a signed 64-bit integer */
    return 1;
}

/* ---- batched -------------------------------------------------------------------- */

static size_t *read_offsets(lua_State *L, int idx, size_t n, const char *what)
{
    if (lua_isnoneornil(L, idx)) return NULL;
    luaL_checktype(L, idx, LUA_TTABLE);
    if ((size_t)lua_rawlen(L, idx) != n)
        luaL_argerror(L, idx, lua_pushfstring(L, "%d offsets for %d tensors",
                                              (int)lua_rawlen(L, idx), (int)n));
    /* userdata-owned so an error below frees it */
    size_t *offs = (size_t *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *offs, 0);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int isint = 0;
        lua_Integer v = lua_tointegerx(L, -1, &isint);
        if (!isint || v < 0)
            luaL_error(L, "%s: offsets[%d] must be an integer >= 0 (0-based element offset)",
                       what, (int)i + 1);
        offs[i] = (size_t)v;
        lua_pop(L, 1);
    }
    return offs;
}

static int l_pack(lua_State *L)
{
    lua_settop(L, 3); /* [flat, tensors, offsets]: the lists below push above */
    ws_tensor *flat = ws_lua_check_tensor(L, 1);
    size_t n;
    ws_tensor **ts = ws_lua_check_tensor_list(L, 2, &n);
    size_t *offs = read_offsets(L, 3, n, "pack");
    if (ws_pack(flat, (const ws_tensor *const *)ts, n, offs) != WS_OK)
        return ws_lua_raise(L, "pack");
    lua_settop(L, 1);
    return 1;
}

static int l_unpack(lua_State *L)
{
    lua_settop(L, 3); /* [flat, tensors, offsets]: the lists below push above */
    ws_tensor *flat = ws_lua_check_tensor(L, 1);
    size_t n;
    ws_tensor **ts = ws_lua_check_tensor_list(L, 2, &n);
    size_t *offs = read_offsets(L, 3, n, "unpack");
    if (ws_unpack(flat, ts, n, offs) != WS_OK) return ws_lua_raise(L, "unpack");
    lua_settop(L, 2);
    return 1;
}

static int l_copy_many(lua_State *L)
{
    lua_settop(L, 2); /* [dsts, srcs] */
    size_t nd, ns;
    ws_tensor **dsts = ws_lua_check_tensor_list(L, 1, &nd);
    ws_tensor **srcs = ws_lua_check_tensor_list(L, 2, &ns);
    if (nd != ns)
        return luaL_error(L, "copy_many: %d destinations but %d sources", (int)nd, (int)ns);
    for (size_t i = 0; i < nd; i++) {
        if (ws_tensor_same_shape(dsts[i], srcs[i])) continue;
        char l1[256], l2[256], s1[160], s2[160];
        return luaL_error(L, "copy_many: item %d: shape mismatch: dst %s is %s, src %s %s",
                          (int)i + 1, label(dsts[i], l1, sizeof l1),
                          ws_tensor_typestr(dsts[i], s1, sizeof s1), label(srcs[i], l2, sizeof l2),
                          ws_tensor_typestr(srcs[i], s2, sizeof s2));
    }
    if (ws_copy_many(dsts, (const ws_tensor *const *)srcs, nd) != WS_OK)
        return ws_lua_raise(L, "copy_many");
    lua_settop(L, 1);
    return 1;
}

/* Reads rows (a list of {cols, pitch} or false per tensor) at idx into two
 * arrays in a new userdata (left on the stack); NULL when idx is nil. */
static int64_t *rows_list(lua_State *L, int idx, size_t n, int64_t **pitch)
{
    *pitch = NULL;
    if (lua_isnil(L, idx)) return NULL;
    luaL_checktype(L, idx, LUA_TTABLE);
    if (lua_rawlen(L, idx) != n)
        luaL_error(L, "checksums: %d tensors but %d rows entries", (int)n,
                   (int)lua_rawlen(L, idx));
    int64_t *v = lua_newuserdatauv(L, (n ? 2 * n : 1) * sizeof *v, 0);
    *pitch = v + n;
    for (size_t i = 0; i < n; i++) {
        v[i] = (*pitch)[i] = 0;
        if (lua_rawgeti(L, idx, (lua_Integer)i + 1) == LUA_TTABLE) { /* [.., r] */
            lua_rawgeti(L, -1, 1);
            lua_rawgeti(L, -2, 2); /* [.., r, cols, pitch] */
            int ok1, ok2;
            lua_Integer c = lua_tointegerx(L, -2, &ok1), p = lua_tointegerx(L, -1, &ok2);
            if (!ok1 || !ok2 || c < 0 || p < c)
                luaL_error(L, "checksums: rows entry %d must be {cols, pitch} with "
                              "0 <= cols <= pitch",
                           (int)i + 1);
            v[i] = (int64_t)c;
            (*pitch)[i] = (int64_t)p;
            lua_pop(L, 2);
        } else if (!lua_isnil(L, -1) && !(lua_isboolean(L, -1) && !lua_toboolean(L, -1))) {
            luaL_error(L, "checksums: rows entry %d must be {cols, pitch} or false, got %s",
                       (int)i + 1, luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
    return v;
}

/* ws.checksums(tensors [, first_indices] [, as_dtype] [, rows]): the checksum
 * of every tensor, in one call, as a cpu i64 tensor (one element per tensor,
 * exact 64-bit values: the shape a verification all-reduces and compares),
 * or nil, msg, code when that tensor cannot be allocated. rows: per tensor
 * {cols, pitch} (ws_tensor_checksum_rows: a block of a larger tensor, with
 * its global indices) or false. */
static int l_checksums(lua_State *L)
{
    lua_settop(L, 4); /* [tensors, firsts, as, rows] */
    size_t n;
    ws_tensor **ts = ws_lua_check_tensor_list(L, 1, &n); /* [.., keep] */
    ws_dtype as = lua_isnil(L, 3) ? WS_DTYPE_COUNT : ws_lua_check_dtype(L, 3, "checksums");
    uint64_t *first = NULL;
    if (!lua_isnil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        if (lua_rawlen(L, 2) != n)
            return luaL_error(L, "checksums: %d tensors but %d first indices", (int)n,
                              (int)lua_rawlen(L, 2));
        first = lua_newuserdatauv(L, (n ? n : 1) * sizeof *first, 0); /* [.., keep, firsts] */
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, 2, (lua_Integer)i + 1);
            int ok;
            lua_Integer f = lua_tointegerx(L, -1, &ok);
            if (!ok || f < 0)
                return luaL_error(L, "checksums: first index %d must be an integer >= 0",
                                  (int)i + 1);
            first[i] = (uint64_t)f;
            lua_pop(L, 1);
        }
    }
    int64_t *pitch, *cols = rows_list(L, 4, n, &pitch); /* [.., rows] */
    int64_t shape = (int64_t)n;
    ws_ltensor *out = ws_lua_new_tensor(L); /* [.., out] */
    ws_tensor_opts o = {.device = ws_device_cpu(), .name = "checksums"};
    ws_status rc = ws_tensor_empty(&out->t, WS_I64, 1, &shape, &o);
    if (rc != WS_OK) return ws_lua_fail(L, rc, "checksums");
    void *sums = NULL;
    if (n && ws_tensor_access(&out->t, WS_ACCESS_WRITE, "checksums", &sums) != WS_OK)
        return ws_lua_raise(L, "checksums");
    if (ws_checksum_many_rows((const ws_tensor *const *)ts, n, first, cols, pitch, as, sums) !=
        WS_OK)
        return ws_lua_raise(L, "checksums");
    ws_tensor_mark_written(&out->t);
    return 1;
}

/* ws.readable(tensors): that every tensor may be read now (live, its pool
 * awake, its contents not discarded by a sleep since they were last
 * written), from the bookkeeping alone: no byte is read, so it costs the
 * same for a 1 GB tensor as for an empty one. Returns the number of tensors;
 * raises the first failure, naming the tensor (and its pool and the sleep
 * that discarded it). */
static int l_readable(lua_State *L)
{
    lua_settop(L, 1); /* [tensors] */
    size_t n;
    ws_tensor **ts = ws_lua_check_tensor_list(L, 1, &n); /* [tensors, keep] */
    for (size_t i = 0; i < n; i++)
        if (ws_tensor_check_readable(ts[i], "readable") != WS_OK)
            return ws_lua_raise(L, "readable");
    lua_pushinteger(L, (lua_Integer)n);
    return 1;
}

/* ---- registration ------------------------------------------------------------------ */

static const luaL_Reg t_methods[] = {
    {"shape", t_shape},
    {"dim", t_dim},
    {"numel", t_numel},
    {"nbytes", t_nbytes},
    {"dtype", t_dtype},
    {"device", t_device},
    {"name", t_name},
    {"is_contiguous", t_is_contiguous},
    {"is_freed", t_is_freed},
    {"narrow", t_narrow},
    {"view", t_view},
    {"reshape", t_reshape},
    {"flat", t_flat},
    {"bytes", t_bytes},
    {"copy_", t_copy_},
    {"fill", t_fill},
    {"random_", t_random_},
    {"to", t_to},
    {"get", t_get},
    {"set", t_set},
    {"checksum", t_checksum},
    {"free", t_free},
    {NULL, NULL},
};

static const luaL_Reg ws_funcs[] = {
    {"tensor", l_tensor},
    {"pack", l_pack},
    {"unpack", l_unpack},
    {"copy_many", l_copy_many},
    {"checksums", l_checksums},
    {"readable", l_readable},
    {NULL, NULL},
};

static const luaL_Reg t_meta[] = {
    {"__gc", t_free},
    {"__close", t_free},
    {"__tostring", t_tostring},
    {NULL, NULL},
};

void ws_open_tensor(lua_State *L)
{
    /* [ws] */
    ws_lua_new_type(L, WS_TENSOR_MT, t_methods, t_meta, NULL);
    luaL_setfuncs(L, ws_funcs, 0);
}
