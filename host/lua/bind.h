/* bind.h: helpers shared by the binding files (one file per native type).
 *
 * Conventions: one metatable per type, named by the constants below; check
 * functions raise "ws.Tensor expected, got nil" through luaL_checkudata;
 * core errors become Lua errors (misuse) or `nil, message, code` returns
 * (environment: device absent, out of memory) through ws_lua_fail. */
#ifndef WS_BIND_H
#define WS_BIND_H

#include <lauxlib.h>
#include <lua.h>

#include "comm.h"
#include "device.h"
#include "pool.h"
#include "status.h"
#include "tensor.h"

#define WS_TENSOR_MT "ws.Tensor"
#define WS_DEVICE_MT "ws.Device"
#define WS_EVENT_MT "ws.Event"
#define WS_POOL_MT "ws.Pool"
#define WS_COMM_MT "ws.Comm"
#define WS_REQUEST_MT "ws.Request"
#define WS_PLAN_MT "ws.Plan"
#define WS_CHECKPOINT_MT "ws.Checkpoint"

/* The userdata of a tensor: the core struct, released when storage == NULL.
 * A view keeps its base's Lua object alive through user value 1. */
typedef struct ws_ltensor {
    ws_tensor t;
} ws_ltensor;

/* Raises the current core error (ws_errmsg) as a Lua error, prefixed with
 * `what` when not NULL. Never returns. */
int ws_lua_raise(lua_State *L, const char *what);
/* Environment failures: pushes nil, message, code name ("nomem", "device",
 * ...) and returns 3. Misuse codes (ERR_ARG, ERR_FREED, ERR_DISCARDED) raise. */
int ws_lua_fail(lua_State *L, ws_status rc, const char *what);
/* Short lowercase code name for ws_status: "arg", "nomem", "device", ... */
const char *ws_lua_code_name(ws_status rc);

/* Tensors. check_* raise on the wrong type; *_live also raises on a freed tensor. */
ws_ltensor *ws_lua_check_ltensor(lua_State *L, int idx);
ws_tensor *ws_lua_check_tensor(lua_State *L, int idx); /* live */
/* Pushes a new released tensor userdata (to be filled by the caller). */
ws_ltensor *ws_lua_new_tensor(lua_State *L);
/* Reads a list of live tensors from the table at idx into a malloc'd array
 * that is kept alive by a userdata pushed on the stack (no leak on error). */
ws_tensor **ws_lua_check_tensor_list(lua_State *L, int idx, size_t *n);

void ws_lua_push_device(lua_State *L, ws_device *d);
ws_pool *ws_lua_check_pool(lua_State *L, int idx);
ws_comm *ws_lua_check_comm(lua_State *L, int idx); /* live */
/* For a plan, which gathers over a comm it was given as an option: the core
 * comm of the ws.Comm at idx (NULL once freed), its label for messages
 * ("'world'", "'color 1 of world'"; pushed and returned), and its count of
 * users, which comm:free() waits for. */
ws_comm *ws_lua_comm_live(lua_State *L, int idx);
const char *ws_lua_comm_name(lua_State *L, int idx);
void ws_lua_comm_hold(lua_State *L, int idx, int delta);

/* Raises for a key of the options table at idx that is not in `keys`
 * (NULL-terminated), naming it and the valid ones: a typo ("bucket_MB") must
 * not silently leave a default in place. */
void ws_lua_check_options(lua_State *L, int idx, const char *const *keys, const char *fname);

/* Creates the metatable `name` of a native type (as liolib's createmeta):
 * luaL_newmetatable sets __name, `meta` adds the metamethods (__gc, __close,
 * __tostring), and __index is the table of `methods`, or when `index` is not
 * NULL a closure of it with that table as upvalue 1 (types with fields). */
void ws_lua_new_type(lua_State *L, const char *name, const luaL_Reg *methods,
                     const luaL_Reg *meta, lua_CFunction index);

/* Pushes the message every freed object raises with: "<type> <label> was
 * freed (...); create it again", label already quoted ("'x'"). */
const char *ws_lua_push_freed(lua_State *L, const char *type, const char *label);
/* Raises it as a bad argument idx. Never returns. */
int ws_lua_raise_freed(lua_State *L, int idx, const char *type, const char *label);
/* Reads the shape table at idx into shape[WS_MAX_DIMS] and returns its number
 * of dimensions; raises "<what>: shape ..." for anything else. allow_infer:
 * one -1 entry is allowed and its 0-based position returned in *infer (else
 * *infer = -1). */
int ws_lua_read_shape(lua_State *L, int idx, const char *what, int64_t *shape, int allow_infer,
                      int *infer);
/* The dtype named by the string at idx; raises "<what>: ..." otherwise. */
ws_dtype ws_lua_check_dtype(lua_State *L, int idx, const char *what);

/* One integer field of a table built by ws_lua_push_int_fields. */
typedef struct ws_lua_int_field {
    const char *name;
    lua_Integer value;
} ws_lua_int_field;
/* Pushes a new table holding the n integer fields, with room for `more`
 * fields the caller sets after (stats and memory reports). */
void ws_lua_push_int_fields(lua_State *L, const ws_lua_int_field *f, int n, int more);

/* The device used when none is given (--device / WSHOST_DEVICE / auto). */
ws_device *ws_lua_default_device(lua_State *L);
void ws_lua_set_default_device(ws_device *d, const char *why);

/* Resolves a ws.Device or a device name at
 * idx: raises for a wrong type or a malformed name ("gpu"); returns
 * WS_ERR_DEVICE with the message set when the named device is absent or
 * unusable, so constructors can return nil, message, "device". */
ws_status ws_lua_to_device(lua_State *L, int idx, ws_device **out);
/* ws.tensor{...} and pool:tensor{...}: creates a tensor from the options table
 * at `opts`. `pool` (may be NULL) is the pool to carve from, its userdata at
 * pool_idx (kept alive by the tensor). Returns the number of results pushed:
 * 1 (the tensor) or 3 (nil, message, code). */
int ws_lua_tensor_from_opts(lua_State *L, int opts, ws_pool *pool, int pool_idx,
                            const char *fname);
/* Ctrl-C in wshost: main's signal handler records it (async-signal-safe);
 * ws.interrupted() reports it. */
void ws_lua_set_interrupted(void);
int ws_lua_is_interrupted(void);

/* Per-type registration, called from luaopen_ws. Each adds its metatable and
 * its functions to the `ws` table at the top of the stack. */
void ws_open_device(lua_State *L);
void ws_open_tensor(lua_State *L);
void ws_open_pool(lua_State *L);
void ws_open_comm(lua_State *L);
void ws_open_plan(lua_State *L);
void ws_open_safetensors(lua_State *L);
void ws_open_save(lua_State *L); /* functions only: save_safetensors, save_checkpoint */
void ws_open_quant(lua_State *L); /* functions only: quantize_fp8_block & co */
void ws_open_sender(lua_State *L); /* ws.sender, ws.proofs (server mode) */

/* Server mode: the core sender of the ws.Sender at idx (NULL once closed),
 * and its count of plans that send through it (close refuses while > 0). */
struct ws_sender;
struct ws_sender *ws_lua_sender_live(lua_State *L, int idx);
void ws_lua_sender_hold(lua_State *L, int idx, int delta);

int luaopen_ws(lua_State *L);

#endif
