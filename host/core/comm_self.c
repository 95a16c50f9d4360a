/* comm_self.c: the host backend of a world of one. Data moves by local
 * copies, and setup and control have no peers to talk to. */
#include <string.h>

#include "comm_internal.h"

static ws_status self_all_gather(ws_comm *c, ws_device *d, const void *send, void *recv,
                                 size_t bytes, ws_comm_request *req)
{
    if (send == recv || bytes == 0) return WS_OK;
    return d->ops->copy(d, recv, send, bytes);
}

static ws_status self_broadcast(ws_comm *c, ws_device *d, void *buf, size_t bytes, int root,
                                ws_comm_request *req)
{
    return WS_OK;
}

/* send/recv are unreachable in a world of one: comm.c rejects a peer equal to
 * the own rank before dispatching. */
static ws_status self_send(ws_comm *c, ws_device *d, const void *buf, size_t bytes, int peer,
                           ws_comm_request *req)
{
    return WS_ERR(WS_ERR_ARG, "send: a world of one has no peers");
}

static ws_status self_recv(ws_comm *c, ws_device *d, void *buf, size_t bytes, int peer,
                           ws_comm_request *req)
{
    return WS_ERR(WS_ERR_ARG, "recv: a world of one has no peers");
}

static ws_status self_all_reduce(ws_comm *c, ws_device *d, void *buf, size_t count, ws_dtype t,
                                 ws_reduce_op op, ws_comm_request *req)
{
    return WS_OK;
}

static ws_status self_reduce_scatter(ws_comm *c, ws_device *d, const void *send, void *recv,
                                     size_t count, ws_dtype t, ws_reduce_op op,
                                     ws_comm_request *req)
{
    return self_all_gather(c, d, send, recv, count * ws_dtype_size(t), req);
}

/* The one piece a rank sends itself. */
static ws_status self_all_to_all(ws_comm *c, ws_device *d, const void *send,
                                 const size_t *send_counts, const size_t *send_displs, void *recv,
                                 const size_t *recv_counts, const size_t *recv_displs,
                                 ws_comm_request *req)
{
    if (send_counts[0] != recv_counts[0])
        return WS_ERR(WS_ERR_ARG, "all_to_all: rank 0 sends itself %zu bytes but expects %zu",
                      send_counts[0], recv_counts[0]);
    if (send_counts[0] == 0) return WS_OK;
    return d->ops->copy(d, (char *)recv + recv_displs[0], (const char *)send + send_displs[0],
                        send_counts[0]);
}

static ws_status self_wait(ws_comm_request *req) { return WS_OK; }

static int self_launched(void) { return 1; }

static ws_status self_init_world(ws_comm *c)
{
    c->rank = 0;
    c->size = 1;
    return WS_OK;
}

static ws_status self_split(ws_comm *parent, int color, int key, ws_comm *child, int *undefined)
{
    *undefined = color < 0;
    return WS_OK;
}

static void self_free(ws_comm *c) {}

static ws_status self_barrier(ws_comm *c) { return WS_OK; }

static ws_status self_max_i64(ws_comm *c, int64_t *v, int n) { return WS_OK; }

static ws_status self_gather_i64(ws_comm *c, const int64_t *mine, int n, int64_t *all)
{
    memmove(all, mine, (size_t)n * sizeof *all);
    return WS_OK;
}

static ws_status self_exchange_i64(ws_comm *c, const int64_t *send, int64_t *recv)
{
    recv[0] = send[0];
    return WS_OK;
}

static ws_status self_bcast_bytes(ws_comm *c, void *buf, size_t bytes, int root) { return WS_OK; }

static ws_status self_reference(ws_comm *c, const char *op, size_t bytes, int iters,
                                double *seconds_per_iter)
{
    return WS_ERR(WS_ERR_UNSUPPORTED, "reference: needs the MPI backend; run under mpirun");
}

static void self_abort(int exit_code) {}

static void self_finalize(void) {}

static const ws_comm_host_ops g_self_ops = {
    .data = {
        .name = "self",
        .all_gather = self_all_gather,
        .broadcast = self_broadcast,
        .send = self_send,
        .recv = self_recv,
        .all_reduce = self_all_reduce,
        .reduce_scatter = self_reduce_scatter,
        .all_to_all = self_all_to_all,
        .wait = self_wait,
    },
    .launched = self_launched,
    .init_world = self_init_world,
    .split = self_split,
    .free = self_free,
    .barrier = self_barrier,
    .max_i64 = self_max_i64,
    .gather_i64 = self_gather_i64,
    .exchange_i64 = self_exchange_i64,
    .bcast_bytes = self_bcast_bytes,
    .reference = self_reference,
    .abort = self_abort,
    .finalize = self_finalize,
    .launch_hint = "this wshost was built without MPI, so the ranks cannot reach each other; "
                   "rebuild with MPI (libopenmpi-dev) or run one process",
};

const ws_comm_host_ops *ws_comm_self_ops(void) { return &g_self_ops; }
