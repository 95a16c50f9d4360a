/* comm_nccl.c: the NCCL backend for cuda tensors.
 *
 * libnccl.so.2 is opened with dlopen on the first collective over cuda
 * tensors in a world of more than one rank (WSHOST_NCCL_LIBRARY names another
 * file), so the binary starts without it and a cpu-only or single-rank run
 * never touches it. nccl.h is not needed either: the few types, enums and
 * prototypes used are declared below to match NCCL's stable C ABI.
 *
 * A communicator is created per ws_comm (rank 0 makes the unique id, the host
 * backend broadcasts it) and bound to the device of the first cuda tensor.
 * Work goes on a stream of the communicator's own, ordered after the device's
 * queue (ws_device_ops.native_stream) by an event, and the device's later
 * work is ordered after the collective by another; so an async gather runs
 * beside the device's copies. Without a native stream: the legacy default
 * stream with a device synchronize before. Waits poll the completion event
 * and ncclCommGetAsyncError, so a failed peer turns into an error (and an
 * aborted communicator) instead of a hang. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_internal.h"
#include "env.h"

#ifdef WS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

/* ---- the NCCL ABI subset ----------------------------------------------- */

typedef int nccl_result;   /* ncclResult_t: 0 success, 7 in progress */
typedef int nccl_dtype;    /* ncclDataType_t */
typedef int nccl_op;       /* ncclRedOp_t */
typedef struct nccl_comm_opaque *nccl_comm;
/* Only its size matters: NCCL fills it and MPI broadcasts it as bytes. */
// cppcheck-suppress unusedStructMember
typedef struct { char internal[128]; } nccl_unique_id;

enum { NCCL_OK = 0, NCCL_IN_PROGRESS = 7 };
enum { NCCL_UINT8 = 1, NCCL_INT32 = 2, NCCL_UINT32 = 3, NCCL_INT64 = 4, NCCL_UINT64 = 5,
       NCCL_FLOAT16 = 6, NCCL_FLOAT32 = 7, NCCL_BFLOAT16 = 9 };
enum { NCCL_SUM = 0, NCCL_MAX = 2 };

static struct {
    int tried;
    void *lib;
    char why[512];
    nccl_result (*get_unique_id)(nccl_unique_id *id);
    nccl_result (*comm_init_rank)(nccl_comm *comm, int nranks, nccl_unique_id id, int rank);
    nccl_result (*all_gather)(const void *s, void *r, size_t count, nccl_dtype t, nccl_comm c,
                              void *stream);
    nccl_result (*broadcast)(const void *s, void *r, size_t count, nccl_dtype t, int root,
                             nccl_comm c, void *stream);
    nccl_result (*send)(const void *s, size_t count, nccl_dtype t, int peer, nccl_comm c,
                        void *stream);
    nccl_result (*recv)(void *r, size_t count, nccl_dtype t, int peer, nccl_comm c, void *stream);
    nccl_result (*all_reduce)(const void *s, void *r, size_t count, nccl_dtype t, nccl_op op,
                              nccl_comm c, void *stream);
    nccl_result (*reduce_scatter)(const void *s, void *r, size_t count, nccl_dtype t, nccl_op op,
                                  nccl_comm c, void *stream);
    nccl_result (*group_start)(void);
    nccl_result (*group_end)(void);
    nccl_result (*comm_abort)(nccl_comm c);
    nccl_result (*comm_destroy)(nccl_comm c);
    const char *(*error_string)(nccl_result r);
    nccl_result (*async_error)(nccl_comm c, nccl_result *err);
} g_lib;

struct ws_nccl_state {
    nccl_comm comm;
    ws_device *device;
    void *stream; /* NCCL's own cudaStream_t; NULL: the legacy default stream */
    int aborted;
    ws_nccl_state *next; /* every live communicator, for ws_nccl_abort_all */
};

static ws_nccl_state *g_states;

#ifdef WS_HAVE_CUDA

static ws_status nccl_fail(const ws_comm *c, nccl_result r, const char *file, int line,
                           const char *what)
{
    return ws_seterr(WS_ERR_COMM, file, line, "%s: NCCL failed on rank %d of %d: %s (code %d); a "
                     "peer may have died or the ranks called different collectives", what,
                     c->rank, c->size, g_lib.error_string ? g_lib.error_string(r) : "?", r);
}

#define CHECK_NCCL(c, call, what)                                                         \
    do {                                                                                  \
        nccl_result check_nccl_rc_ = (call);                                              \
        if (check_nccl_rc_ != NCCL_OK && check_nccl_rc_ != NCCL_IN_PROGRESS)              \
            return nccl_fail((c), check_nccl_rc_, __FILE__, __LINE__, (what));            \
    } while (0)

static void *stream_of(ws_device *d) { return d->ops->native_stream ? d->ops->native_stream(d) : NULL; }

static ws_status load_library(void)
{
    if (g_lib.lib) return WS_OK;
    if (g_lib.tried) return WS_ERR(WS_ERR_UNSUPPORTED, "%s", g_lib.why);
    g_lib.tried = 1;
    const char *path = ws_env_get("WSHOST_NCCL_LIBRARY");
    if (!path) path = "libnccl.so.2";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(g_lib.why, sizeof g_lib.why, "comm: cannot load NCCL (%s): %s; install NCCL 2 or "
                 "set WSHOST_NCCL_LIBRARY to libnccl.so.2", path, dlerror());
        return WS_ERR(WS_ERR_UNSUPPORTED, "%s", g_lib.why);
    }
    struct { const char *name; void **slot; } syms[] = {
        {"ncclGetUniqueId", (void **)&g_lib.get_unique_id},
        {"ncclCommInitRank", (void **)&g_lib.comm_init_rank},
        {"ncclAllGather", (void **)&g_lib.all_gather},
        {"ncclBroadcast", (void **)&g_lib.broadcast},
        {"ncclSend", (void **)&g_lib.send},
        {"ncclRecv", (void **)&g_lib.recv},
        {"ncclAllReduce", (void **)&g_lib.all_reduce},
        {"ncclReduceScatter", (void **)&g_lib.reduce_scatter},
        {"ncclGroupStart", (void **)&g_lib.group_start},
        {"ncclGroupEnd", (void **)&g_lib.group_end},
        {"ncclCommAbort", (void **)&g_lib.comm_abort},
        {"ncclCommDestroy", (void **)&g_lib.comm_destroy},
        {"ncclGetErrorString", (void **)&g_lib.error_string},
        {"ncclCommGetAsyncError", (void **)&g_lib.async_error},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        void *p = dlsym(lib, syms[i].name);
        if (!p) {
            snprintf(g_lib.why, sizeof g_lib.why, "comm: %s has no %s; NCCL 2.12 or newer is "
                     "needed", path, syms[i].name);
            dlclose(lib);
            for (size_t k = 0; k < i; k++) *syms[k].slot = NULL;
            return WS_ERR(WS_ERR_UNSUPPORTED, "%s", g_lib.why);
        }
        memcpy(syms[i].slot, &p, sizeof p);
    }
    g_lib.lib = lib;
    return WS_OK;
}

ws_status ws_nccl_ensure(ws_comm *c, ws_device *d)
{
    if (c->nccl) {
        if (c->nccl->aborted)
            return WS_ERR(WS_ERR_COMM, "comm: the NCCL communicator was aborted after an earlier "
                          "failure; the job cannot continue");
        if (c->nccl->device != d)
            return WS_ERR(WS_ERR_ARG, "comm: this communicator uses %s for NCCL; a tensor on %s "
                          "needs a communicator of its own (comm:split)", c->nccl->device->name,
                          d->name);
        return WS_OK;
    }
    WS_TRY(load_library());
    if (cudaSetDevice(d->index) != cudaSuccess)
        return WS_ERR(WS_ERR_DEVICE, "comm: cannot select %s for NCCL", d->name);
    nccl_unique_id id;
    memset(&id, 0, sizeof id);
    if (c->rank == 0) CHECK_NCCL(c, g_lib.get_unique_id(&id), "comm: ncclGetUniqueId");
    WS_TRY(c->host->bcast_bytes(c, &id, sizeof id, 0));
    ws_nccl_state *s = calloc(1, sizeof *s);
    if (!s) return WS_ERR(WS_ERR_NOMEM, "comm: out of host memory for NCCL");
    nccl_result r = g_lib.comm_init_rank(&s->comm, c->size, id, c->rank);
    if (r != NCCL_OK) {
        free(s);
        return nccl_fail(c, r, __FILE__, __LINE__, "comm: ncclCommInitRank");
    }
    s->device = d;
    /* Collectives get a stream of their own, ordered after the device's work
     * by events, so a gather can run while the device copies out the
     * previous bucket (the transfer engine's overlap). */
    if (stream_of(d)) {
        cudaStream_t st;
        if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) {
            cudaGetLastError();
            g_lib.comm_destroy(s->comm);
            free(s);
            return WS_ERR(WS_ERR_DEVICE, "comm: cannot create a stream for NCCL on %s", d->name);
        }
        s->stream = st;
    }
    s->next = g_states;
    g_states = s;
    c->nccl = s;
    snprintf(c->backend, sizeof c->backend, "%s+nccl", c->host->data.name);
    return WS_OK;
}

/* Where NCCL work goes: the communicator's own stream, or the legacy
 * default stream when the device backend has no streams. */
static void *nccl_stream(const ws_comm *c) { return c->nccl->stream; }

/* Orders the collective after all work queued on the device so far. */
static ws_status before(ws_comm *c, ws_device *d)
{
    void *dev = stream_of(d);
    if (!dev || !c->nccl->stream) return ws_device_synchronize(d);
    cudaEvent_t ready;
    cudaError_t e = cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
    if (e == cudaSuccess) {
        e = cudaEventRecord(ready, (cudaStream_t)dev);
        if (e == cudaSuccess) e = cudaStreamWaitEvent((cudaStream_t)c->nccl->stream, ready, 0);
        cudaEventDestroy(ready); /* released once the wait is satisfied */
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        return WS_ERR(WS_ERR_DEVICE, "comm: ordering NCCL after the work on %s: %s", d->name,
                      cudaGetErrorString(e));
    }
    return WS_OK;
}

/* Waits for `done` while watching for NCCL failures, then orders the device's
 * later work after it. */
static ws_status wait_done(ws_comm *c, cudaEvent_t done, const char *what)
{
    ws_nccl_state *s = c->nccl;
    struct timespec nap = {0, 20000};
    for (;;) {
        cudaError_t e = cudaEventQuery(done);
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) {
            cudaGetLastError();
            return WS_ERR(WS_ERR_DEVICE, "%s: CUDA error while waiting for NCCL on rank %d: %s",
                          what, c->rank, cudaGetErrorString(e));
        }
        nccl_result ae = NCCL_OK;
        g_lib.async_error(s->comm, &ae);
        if (ae != NCCL_OK && ae != NCCL_IN_PROGRESS) {
            g_lib.comm_abort(s->comm);
            s->aborted = 1;
            return nccl_fail(c, ae, __FILE__, __LINE__, what);
        }
        nanosleep(&nap, NULL);
    }
    void *dev = stream_of(s->device);
    if (dev && cudaStreamWaitEvent((cudaStream_t)dev, done, 0) != cudaSuccess) {
        cudaGetLastError();
        return WS_ERR(WS_ERR_DEVICE, "%s: ordering %s after NCCL failed", what, s->device->name);
    }
    return WS_OK;
}

/* After enqueueing: a blocking call waits here; an async one keeps the event
 * for wait(). Either way the caller's next device work is ordered after it. */
static ws_status after(ws_comm *c, ws_device *d, ws_comm_request *req, const char *what)
{
    cudaEvent_t done;
    cudaError_t e = cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(done, (cudaStream_t)nccl_stream(c));
    if (e != cudaSuccess) {
        cudaGetLastError();
        return WS_ERR(WS_ERR_DEVICE, "%s: recording the end of the NCCL call on %s: %s", what,
                      d->name, cudaGetErrorString(e));
    }
    if (req) {
        req->impl = (void *)done;
        return WS_OK;
    }
    ws_status rc = wait_done(c, done, what);
    cudaEventDestroy(done);
    return rc;
}

static ws_status nccl_wait(ws_comm_request *req)
{
    if (!req->impl) return WS_OK;
    cudaEvent_t done = (cudaEvent_t)req->impl;
    req->impl = NULL;
    ws_status rc = wait_done(req->comm, done, req->what);
    cudaEventDestroy(done);
    return rc;
}

static ws_status n_all_gather(ws_comm *c, ws_device *d, const void *send, void *recv,
                              size_t bytes, ws_comm_request *req)
{
    WS_TRY(before(c, d));
    CHECK_NCCL(c, g_lib.all_gather(send, recv, bytes, NCCL_UINT8, c->nccl->comm, nccl_stream(c)),
               "all_gather");
    return after(c, d, req, "all_gather");
}

static ws_status n_broadcast(ws_comm *c, ws_device *d, void *buf, size_t bytes, int root,
                             ws_comm_request *req)
{
    WS_TRY(before(c, d));
    CHECK_NCCL(c, g_lib.broadcast(buf, buf, bytes, NCCL_UINT8, root, c->nccl->comm, nccl_stream(c)),
               "broadcast");
    return after(c, d, req, "broadcast");
}

static ws_status n_send(ws_comm *c, ws_device *d, const void *buf, size_t bytes, int peer,
                        ws_comm_request *req)
{
    WS_TRY(before(c, d));
    CHECK_NCCL(c, g_lib.send(buf, bytes, NCCL_UINT8, peer, c->nccl->comm, nccl_stream(c)), "send");
    return after(c, d, req, "send");
}

static ws_status n_recv(ws_comm *c, ws_device *d, void *buf, size_t bytes, int peer,
                        ws_comm_request *req)
{
    WS_TRY(before(c, d));
    CHECK_NCCL(c, g_lib.recv(buf, bytes, NCCL_UINT8, peer, c->nccl->comm, nccl_stream(c)), "recv");
    return after(c, d, req, "recv");
}

/* Integer sums use unsigned types so they wrap like the MPI backend. */
static ws_status reduce_type(ws_dtype t, ws_reduce_op op, const char *what, nccl_dtype *out)
{
    switch (t) {
    case WS_F32: *out = NCCL_FLOAT32; return WS_OK;
    case WS_BF16: *out = NCCL_BFLOAT16; return WS_OK;
    case WS_F16: *out = NCCL_FLOAT16; return WS_OK;
    case WS_U8: *out = NCCL_UINT8; return WS_OK;
    case WS_I32: *out = op == WS_REDUCE_SUM ? NCCL_UINT32 : NCCL_INT32; return WS_OK;
    case WS_I64: *out = op == WS_REDUCE_SUM ? NCCL_UINT64 : NCCL_INT64; return WS_OK;
    default:
        return WS_ERR(WS_ERR_UNSUPPORTED, "%s: NCCL cannot reduce %s tensors; reduce a bf16 or "
                      "f32 copy instead", what, ws_dtype_name(t));
    }
}

static ws_status n_all_reduce(ws_comm *c, ws_device *d, void *buf, size_t count, ws_dtype t,
                              ws_reduce_op op, ws_comm_request *req)
{
    nccl_dtype nt = NCCL_UINT8;
    WS_TRY(reduce_type(t, op, "all_reduce", &nt));
    WS_TRY(before(c, d));
    CHECK_NCCL(c, g_lib.all_reduce(buf, buf, count, nt, op == WS_REDUCE_SUM ? NCCL_SUM : NCCL_MAX,
                                   c->nccl->comm, nccl_stream(c)), "all_reduce");
    return after(c, d, req, "all_reduce");
}

static ws_status n_reduce_scatter(ws_comm *c, ws_device *d, const void *send, void *recv,
                                  size_t count, ws_dtype t, ws_reduce_op op, ws_comm_request *req)
{
    nccl_dtype nt = NCCL_UINT8;
    WS_TRY(reduce_type(t, op, "reduce_scatter", &nt));
    WS_TRY(before(c, d));
    CHECK_NCCL(c, g_lib.reduce_scatter(send, recv, count, nt,
                                       op == WS_REDUCE_SUM ? NCCL_SUM : NCCL_MAX, c->nccl->comm,
                                       nccl_stream(c)), "reduce_scatter");
    return after(c, d, req, "reduce_scatter");
}

/* Grouped sends and receives: NCCL runs the pairs together, as one
 * collective (the piece a rank sends itself is a send and a recv too). */
static ws_status n_all_to_all(ws_comm *c, ws_device *d, const void *send, const size_t *sc,
                              const size_t *sd, void *recv, const size_t *rcn, const size_t *rd,
                              ws_comm_request *req)
{
    WS_TRY(before(c, d));
    CHECK_NCCL(c, g_lib.group_start(), "all_to_all");
    nccl_result r = NCCL_OK;
    for (int q = 0; q < c->size && (r == NCCL_OK || r == NCCL_IN_PROGRESS); q++) {
        if (sc[q])
            r = g_lib.send((const char *)send + sd[q], sc[q], NCCL_UINT8, q, c->nccl->comm,
                           nccl_stream(c));
        if (rcn[q] && (r == NCCL_OK || r == NCCL_IN_PROGRESS))
            r = g_lib.recv((char *)recv + rd[q], rcn[q], NCCL_UINT8, q, c->nccl->comm,
                           nccl_stream(c));
    }
    /* The group is closed even after a failed enqueue, so NCCL is left usable
     * for the abort. */
    nccl_result end = g_lib.group_end();
    CHECK_NCCL(c, r, "all_to_all");
    CHECK_NCCL(c, end, "all_to_all");
    return after(c, d, req, "all_to_all");
}

static const ws_comm_ops g_nccl_ops = {
    .name = "nccl",
    .all_gather = n_all_gather,
    .broadcast = n_broadcast,
    .send = n_send,
    .recv = n_recv,
    .all_reduce = n_all_reduce,
    .reduce_scatter = n_reduce_scatter,
    .all_to_all = n_all_to_all,
    .wait = nccl_wait,
};

const ws_comm_ops *ws_comm_nccl_ops(void) { return &g_nccl_ops; }

#else /* !WS_HAVE_CUDA: there are no cuda tensors, so NCCL is never reached. */

ws_status ws_nccl_ensure(ws_comm *c, ws_device *d)
{
    return WS_ERR(WS_ERR_UNSUPPORTED, "comm: %s tensors need NCCL, and this wshost was built "
                  "without CUDA", d->name);
}

const ws_comm_ops *ws_comm_nccl_ops(void) { return &ws_comm_self_ops()->data; }

#endif

void ws_nccl_destroy(ws_comm *c)
{
    ws_nccl_state *s = c->nccl;
    if (!s) return;
    for (ws_nccl_state **p = &g_states; *p; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            break;
        }
    /* An aborted communicator is already gone. */
    if (!s->aborted) g_lib.comm_destroy(s->comm);
#ifdef WS_HAVE_CUDA
    if (s->stream) cudaStreamDestroy((cudaStream_t)s->stream);
#endif
    free(s);
    c->nccl = NULL;
}

void ws_nccl_abort_all(void)
{
    for (ws_nccl_state *s = g_states; s; s = s->next)
        if (!s->aborted) {
            g_lib.comm_abort(s->comm);
            s->aborted = 1;
        }
}
