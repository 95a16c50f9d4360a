/* ws.h: the C API of libwshost, for programs that embed wshost.
 *
 * A ws_host runs one wshost session: it loads a pipeline file (the same Lua
 * policy the wshost binary runs), takes the caller's memory as the trainer's,
 * the adapter's and the engine's tensors, and moves weights between them one
 * step at a time. The policy, the plans and the checks stay in wshost; the
 * caller owns its memory and says when to step.
 *
 *     ws_host *h = ws_host_new();
 *     const char *keys[] = {"model"}, *values[] = {"tiny"};
 *     if (ws_host_load(h, "pipelines/verl_lora.lua", 1, keys, values) != 0)
 *         fprintf(stderr, "%s\n", ws_host_error(h));
 *     ws_host_memory m = {.data = p, .nbytes = n, .device_type = WS_HOST_CPU,
 *                         .dtype = "bf16", .ndim = 2, .shape = {64, 32}};
 *     ws_host_register(h, "trainer", "model.layers.0.mlp.down_proj.weight", &m, 0, NULL);
 *     ...
 *     char *record;
 *     ws_host_step(h, &record);   // JSON text of the step's record
 *     ws_host_free_string(record);
 *     ws_host_close(h, NULL);
 *     ws_host_free(h);
 *
 * Conventions:
 * - Every call that can fail returns 0 on success and -1 on failure, and
 *   ws_host_error() then gives the message (what was being done, to what:
 *   "register: trainer tensor 'model.x.weight': ..."). Errors never unwind
 *   through the caller: wshost runs everything in a protected call and frees
 *   what it allocated before returning.
 * - A ws_host is used by one thread at a time. A call made from inside a
 *   callback of the same host is refused (-1), never run half-way.
 * - Strings passed in are copied; strings handed out are owned by the host
 *   unless the function says they are malloc'd.
 * - Multi-rank jobs: under mpirun the session's comm starts MPI inside the
 *   library (MPI is finalized at process exit).
 *
 * Build against it with `find_package(wshost)` (target wshost::wshost) or
 * `pkg-config --cflags --libs wshost`. docs/c-api.md has the details. */
#ifndef WSHOST_WS_H
#define WSHOST_WS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define WS_HOST_API __attribute__((visibility("default")))
#else
#define WS_HOST_API
#endif

#define WS_HOST_MAX_DIMS 8

/* Device kinds, with DLPack's numbers (kDLCPU, kDLCUDA). */
enum { WS_HOST_CPU = 1, WS_HOST_CUDA = 2 };

typedef struct ws_host ws_host;

/* Memory the caller lends wshost, or memory wshost lends the caller.
 * The bytes are dense and row-major: nbytes == product(shape) * dtype size. */
typedef struct ws_host_memory {
    void *data;
    size_t nbytes;
    int device_type;  /* WS_HOST_CPU or WS_HOST_CUDA */
    int device_index; /* GPU ordinal; 0 for the cpu */
    /* "f32", "bf16", "f16", "fp8" (e4m3fn), "u8", "i32", "i64" (the long
     * names "float32", "bfloat16", "float8_e4m3fn", ... are accepted too). */
    const char *dtype;
    int ndim;
    int64_t shape[WS_HOST_MAX_DIMS];
    /* Called once with release_ctx when wshost no longer uses memory it was
     * lent (may be NULL). Unused in memory wshost hands out. */
    void (*release)(void *release_ctx);
    void *release_ctx;
} ws_host_memory;

/* One tensor a role expects (ws_host_expected). Strings stay valid until the
 * next ws_host_expected call with i == 0, or ws_host_free. */
typedef struct ws_host_param {
    const char *name;
    const char *dtype;
    int ndim;
    int64_t shape[WS_HOST_MAX_DIMS];
} ws_host_param;

/* A new host with no session (NULL only when out of memory). */
WS_HOST_API ws_host *ws_host_new(void);
/* Frees the host, its session (without closing it) and everything wshost
 * allocated; memory lent to it is released (the release callbacks run
 * here at the latest). NULL is a no-op; from inside one of its own callbacks
 * it is refused (ws_host_error says so) and the host stays valid. */
WS_HOST_API void ws_host_free(ws_host *h);
/* The message of the last failed call, "" after a successful one. Valid until
 * the next call on h. */
WS_HOST_API const char *ws_host_error(const ws_host *h);
/* wshost's version, "0.1.0". */
WS_HOST_API const char *ws_host_version(void);

/* Opens the session of the pipeline file at `path` with n config overrides
 * keys[i] = values[i] (strings; the pipeline's config converts and checks
 * them: an unknown key or a bad value fails here, naming it). Once per host. */
WS_HOST_API int ws_host_load(ws_host *h, const char *path, size_t n, const char *const *keys,
                             const char *const *values);

/* The tensors `role` ("trainer", "adapter", "engine") expects, one by one:
 * fills *out for i = 0, 1, ... and returns 1 once i is past the end. A call
 * with i == 0 asks the session again; later ones read that answer. */
WS_HOST_API int ws_host_expected(ws_host *h, const char *role, size_t i, ws_host_param *out);

/* Lends the caller's memory to the session as `role`'s tensor `name`, writable
 * (wshost writes engine tensors on a sync). global_ndim/global_shape give the
 * full tensor's shape when mem holds this rank's dim-0 shard (0/NULL: mem is
 * the whole tensor). mem->release runs exactly once when wshost is done with
 * the memory, also when this call fails (then possibly later, at the latest
 * in ws_host_free). The memory must stay valid until then. */
WS_HOST_API int ws_host_register(ws_host *h, const char *role, const char *name,
                                 const ws_host_memory *mem, int global_ndim,
                                 const int64_t *global_shape);

/* Allocates the engine tensor `name` in the session's sleepable weights pool
 * (the engine allocates through wshost, which sleeps and wakes the memory).
 * *out describes it; the address stays the same across sleep and wake. The
 * memory is valid until ws_host_close or ws_host_free. */
WS_HOST_API int ws_host_alloc(ws_host *h, const char *name, int ndim, const int64_t *shape,
                              const char *dtype, ws_host_memory *out);

/* A callback for a session event: "train" and "rollout" (arg = the step),
 * "sleep" (arg = the level), "wake" (sarg = the tag, such as "weights").
 * The unused one of arg/sarg is 0/NULL. Returns 0, or non-zero after writing
 * a message into err[errlen]: the step then fails with a message that names
 * the event and carries that text. */
typedef int (*ws_host_callback)(void *ud, const char *event, long long arg, const char *sarg,
                                char *err, size_t errlen);
/* Calls fn(ud, ...) on `event` (after ws_host_load). */
WS_HOST_API int ws_host_on(ws_host *h, const char *event, ws_host_callback fn, void *ud);

/* Runs one step of the pipeline (the first also checks what was registered
 * against what the engine expects and builds the plans, before any byte
 * moves). *record (may be NULL: not wanted) gets the step's record as
 * malloc'd JSON text. wshost's device work is complete when it returns. */
WS_HOST_API int ws_host_step(ws_host *h, char **record);
/* Ends the session: *summary (may be NULL) gets its summary as malloc'd JSON
 * text. Memory from ws_host_alloc is freed; the host takes no more steps. */
WS_HOST_API int ws_host_close(ws_host *h, char **summary);
/* Frees a string handed out by this API (same as free). */
WS_HOST_API void ws_host_free_string(char *s);

/* Stops the running call at its next Lua step with the error "interrupted!".
 * Safe from a signal handler or another thread (the Ctrl-C path). */
WS_HOST_API void ws_host_interrupt(ws_host *h);

/* For DLPack producers and consumers: wshost's CUDA stream on GPU `index`
 * (a cudaStream_t; NULL when wshost has no CUDA) and a wait for all wshost
 * work queued on that GPU (0, or -1 with the message in err[errlen]). */
WS_HOST_API void *ws_host_cuda_stream(int index);
WS_HOST_API int ws_host_cuda_synchronize(int index, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
