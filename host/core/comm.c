/* comm.c: the world, argument checks, the mismatch check and backend
 * dispatch for collectives. Backends (comm_self.c, comm_mpi.c, comm_nccl.c)
 * are reached only through their tables, so nothing here depends on MPI.
 *
 * Every collective validates its tensors here (live, readable, contiguous,
 * one device, sizes consistent) so the backends only move bytes. When the
 * world has more than one rank and checking is on (the default; the
 * environment variable WSHOST_COMM_CHECK=0 or ws_comm_set_check turns it
 * off), each collective first runs one tiny all-reduce of (collective kind,
 * numel, dtype, root/op) so ranks that disagree get the same clear message
 * instead of corrupt data or a hang. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm_internal.h"
#include "env.h"
#include "fault.h"
#include "pool.h"

static ws_comm g_world;
static int g_world_ready, g_shut;
/* The host backend that started (or is starting) the world: abort goes
 * through it even when joining the world failed half-way. */
static const ws_comm_host_ops *g_host;

/* ---- the world --------------------------------------------------------------- */

/* A rank that cannot reach its peers must not run as a world of one: every
 * rank would sync alone and report success. */
static ws_status check_alone(const ws_launcher *l)
{
    int tasks = l->tasks;
    const char *var = l->tasks_var;
    if (tasks <= 1) return WS_OK;
    const ws_comm_host_ops *b = ws_comm_host_backends[0] ? ws_comm_host_backends[0]
                                                         : ws_comm_self_ops();
    return WS_ERR(WS_ERR_COMM, "comm: this process is one of %d tasks (%s) but %s", tasks, var,
                  b->launch_hint);
}

/* Ends the job when a rank of a multi-rank world exits without
 * ws_comm_shutdown: a failing rank must never leave its peers blocked in a
 * collective. A clean exit (status 0) shuts down instead. */
static void at_exit(int status, void *arg)
{
    if (g_shut) return;
    if (status == 0) {
        ws_comm_shutdown();
        return;
    }
    ws_comm_abort(status);
}

/* The mismatch check is a protocol every rank must speak alike: a rank that
 * checks waits in an agreement that a rank which does not never joins. So
 * the world's ranks agree on WSHOST_COMM_CHECK once, at its creation, and a
 * difference is an error on every rank (kept: each later call repeats it). */
static ws_status g_check_rc = WS_OK;
static char g_check_msg[256];

static ws_status agree_check(ws_comm *w, int check)
{
    if (w->size == 1) return WS_OK;
    int64_t mm[2] = {check != 0, -(int64_t)(check != 0)};
    ws_status rc = w->host->max_i64(w, mm, 2);
    if (rc != WS_OK) snprintf(g_check_msg, sizeof g_check_msg, "%s", ws_errmsg());
    if (rc != WS_OK || mm[0] == -mm[1]) return rc;
    int64_t *all = malloc((size_t)w->size * sizeof *all), mine = check != 0;
    int differs = -1;
    if (all && w->host->gather_i64(w, &mine, 1, all) == WS_OK)
        for (int r = 1; r < w->size && differs < 0; r++)
            if (all[r] != all[0]) differs = r;
    const char *why = "every rank must set it alike (a rank that checks would wait for the "
                      "others forever)";
    if (differs > 0)
        snprintf(g_check_msg, sizeof g_check_msg, "comm: ranks disagree on WSHOST_COMM_CHECK: "
                 "rank 0 has the check %s, rank %d has it %s; %s", all[0] ? "on" : "off",
                 differs, all[differs] ? "on" : "off", why);
    else
        snprintf(g_check_msg, sizeof g_check_msg, "comm: ranks disagree on WSHOST_COMM_CHECK "
                 "(on at some, off at others); %s", why);
    free(all);
    return WS_ERR(WS_ERR_ARG, "%s", g_check_msg);
}

ws_status ws_comm_world(ws_comm **out)
{
    if (g_shut)
        return WS_ERR(WS_ERR_COMM, "comm: the world was shut down (ws_comm_shutdown); "
                      "collectives are not available after it");
    if (!g_world_ready) {
        const ws_launcher *l;
        int check;
        ws_status rc = ws_env_launcher(&l);
        if (rc == WS_OK) rc = ws_env_comm_check(&check);
        if (rc != WS_OK) {
            ws_errprefix("comm");
            return rc;
        }
        const ws_comm_host_ops *host = ws_comm_self_ops();
        for (int i = 0; ws_comm_host_backends[i]; i++)
            if (ws_comm_host_backends[i]->launched()) {
                host = ws_comm_host_backends[i];
                break;
            }
        if (host == ws_comm_self_ops()) WS_TRY(check_alone(l));
        ws_comm w = {0};
        w.is_world = 1;
        w.host = host;
        snprintf(w.backend, sizeof w.backend, "%s", host->data.name);
        if (host != ws_comm_self_ops() && !g_host) on_exit(at_exit, NULL);
        g_host = host;
        WS_TRY(host->init_world(&w));
        WS_TRY(ws_comm_watch_peers(&w));
        w.check = check && w.size > 1;
        g_world = w;
        g_world_ready = 1;
        g_check_rc = agree_check(&g_world, check);
    }
    if (g_check_rc != WS_OK) return WS_ERR(g_check_rc, "%s", g_check_msg);
    *out = &g_world;
    return WS_OK;
}

int ws_comm_rank(const ws_comm *c) { return c->rank; }
int ws_comm_size(const ws_comm *c) { return c->size; }
int ws_comm_local_rank(const ws_comm *c) { return c->local_rank; }
const char *ws_comm_backend(const ws_comm *c) { return c->backend; }
int ws_comm_is_multi(void) { return g_world_ready && !g_shut && g_world.size > 1; }
void ws_comm_set_check(ws_comm *c, int on) { c->check = on && c->size > 1; }
int ws_comm_get_check(const ws_comm *c) { return c->check; }

ws_status ws_comm_split(ws_comm *c, int color, int key, ws_comm **out)
{
    *out = NULL;
    ws_comm *child = ws_calloc(1, sizeof *child);
    if (!child) return WS_ERR(WS_ERR_NOMEM, "split: out of host memory");
    child->host = c->host;
    child->size = 1;
    child->local_rank = c->local_rank;
    snprintf(child->backend, sizeof child->backend, "%s", c->host->data.name);
    int undefined = 0;
    ws_status rc = c->host->split(c, color, key, child, &undefined);
    if (rc != WS_OK || undefined) {
        free(child);
        return rc;
    }
    child->check = c->check && child->size > 1;
    *out = child;
    return WS_OK;
}

void ws_comm_free(ws_comm *c)
{
    if (!c || c->is_world) return;
    ws_nccl_destroy(c);
    c->host->free(c);
    free(c);
}

/* ---- the mismatch check ------------------------------------------------------ */

enum {
    K_ALL_GATHER = 1,
    K_BROADCAST,
    K_ALL_REDUCE,
    K_REDUCE_SCATTER,
    K_BARRIER,
    K_ALL_TO_ALL,
    K_TRANSFER
};
static const char *const kind_names[] = {"?",       "all_gather", "broadcast", "all_reduce",
                                         "reduce_scatter", "barrier", "all_to_all", "transfer"};
#define N_CHECK 4

/* Ranks agree on v = {kind, numel, dtype, extra}? `size_what` names the
 * numel ("send size"), `extra_what` the fourth entry ("root", "op"; NULL:
 * unused). Entries must be > INT64_MIN (they are negated for the min). */
static ws_status agree(ws_comm *c, const char *what, const int64_t v[N_CHECK],
                       const char *size_what, const char *extra_what)
{
    if (!c->check || c->size == 1) return WS_OK;
    int64_t mm[2 * N_CHECK];
    for (int i = 0; i < N_CHECK; i++) {
        mm[i] = v[i];
        mm[N_CHECK + i] = -v[i];
    }
    WS_TRY(ws_comm_max_i64(c, mm, 2 * N_CHECK));
    int same = 1;
    for (int i = 0; i < N_CHECK; i++) same &= mm[i] == -mm[N_CHECK + i];
    if (same) return WS_OK;
    /* Rare path: find who differs from rank 0, identically on every rank. */
    int64_t *all = malloc((size_t)c->size * N_CHECK * sizeof *all);
    if (!all) return WS_ERR(WS_ERR_NOMEM, "%s: ranks disagree (out of memory for details)", what);
    ws_status rc = c->host->gather_i64(c, v, N_CHECK, all);
    if (rc != WS_OK) {
        free(all);
        return rc;
    }
    for (int i = 0; i < N_CHECK && rc == WS_OK; i++) {
        for (int r = 1; r < c->size; r++) {
            int64_t a = all[i], b = all[(size_t)r * N_CHECK + i];
            if (a == b) continue;
            if (i == 0)
                rc = WS_ERR(WS_ERR_ARG, "%s: ranks called different collectives: rank 0 called "
                            "%s, rank %d called %s; every rank must issue the same collectives "
                            "in the same order", what, kind_names[a], r, kind_names[b]);
            else if (i == 1)
                rc = WS_ERR(WS_ERR_ARG, "%s: ranks disagree on the %s: rank 0 has %lld elements, "
                            "rank %d has %lld", what, size_what, (long long)a, r, (long long)b);
            else if (i == 2)
                rc = WS_ERR(WS_ERR_ARG, "%s: ranks disagree on the dtype: rank 0 has %s, rank %d "
                            "has %s", what, ws_dtype_name((ws_dtype)a), r,
                            ws_dtype_name((ws_dtype)b));
            else
                rc = WS_ERR(WS_ERR_ARG, "%s: ranks disagree on the %s: rank 0 has %lld, rank %d "
                            "has %lld", what, extra_what ? extra_what : "arguments",
                            (long long)a, r, (long long)b);
            break;
        }
    }
    free(all);
    return rc;
}

ws_status ws_comm_max_i64(ws_comm *c, int64_t *v, int n)
{
    if (g_shut)
        return WS_ERR(WS_ERR_COMM, "check: comm was shut down (ws_comm_shutdown)");
    if (c->size == 1) return WS_OK;
    return c->host->max_i64(c, v, n);
}

/* ---- validation and dispatch ------------------------------------------------ */

static ws_status usable(ws_comm *c, const char *what)
{
    if (g_shut)
        return WS_ERR(WS_ERR_COMM, "%s: comm was shut down (ws_comm_shutdown)", what);
    return WS_OK;
}

/* Checks t for a collective that reads or writes it (access: WS_ACCESS_*)
 * and hands out its data pointer. */
static ws_status check_t(const ws_tensor *t, const char *what, int access, void **ptr)
{
    WS_TRY(ws_tensor_access(t, access, what, ptr));
    if (!ws_tensor_is_contiguous(t)) {
        char b[160];
        return WS_ERR(WS_ERR_ARG, "%s: tensor %s is not contiguous; collectives need contiguous "
                      "tensors (copy it into one first)", what, ws_tensor_label(t, b, sizeof b));
    }
    return WS_OK;
}

static ws_status same_device(const ws_tensor *a, const ws_tensor *b, const char *what)
{
    if (ws_tensor_device(a) == ws_tensor_device(b)) return WS_OK;
    char ba[160], bb[160];
    return WS_ERR(WS_ERR_ARG, "%s: %s is on %s but %s is on %s; both must be on one device", what,
                  ws_tensor_label(a, ba, sizeof ba), ws_tensor_device(a)->name,
                  ws_tensor_label(b, bb, sizeof bb), ws_tensor_device(b)->name);
}

/* A collective that reads send while it writes recv needs them apart. */
static ws_status check_apart(const ws_tensor *send, const ws_tensor *recv, const char *what)
{
    if (send->storage != recv->storage) return WS_OK;
    size_t sb, se, rb, re;
    ws_tensor_byte_span(send, &sb, &se);
    ws_tensor_byte_span(recv, &rb, &re);
    char bs[160], br[160];
    if (sb < re && rb < se)
        return WS_ERR(WS_ERR_ARG, "%s: send %s and recv %s overlap; use separate buffers", what,
                      ws_tensor_label(send, bs, sizeof bs), ws_tensor_label(recv, br, sizeof br));
    return WS_OK;
}

static ws_status pick(ws_comm *c, ws_device *d, const ws_comm_ops **ops)
{
    /* WSHOST_COMM_NCCL=1 sends cuda tensors through NCCL even in a world of
     * one, so the NCCL path can be exercised on a single GPU without a
     * launcher. */
    int force_nccl = 0;
    if (d->kind == WS_DEVICE_CUDA) WS_TRY(ws_env_comm_nccl(&force_nccl));
    if (c->size == 1 && !force_nccl) {
        *ops = &ws_comm_self_ops()->data;
    } else if (d->kind == WS_DEVICE_CUDA) {
        WS_TRY(ws_nccl_ensure(c, d));
        *ops = ws_comm_nccl_ops();
    } else {
        *ops = &c->host->data;
    }
    return WS_OK;
}

/* A request for an async call (NULL for a blocking one). `outs` bit i: tensor
 * i is written. Holding storage references keeps the bytes valid until wait. */
static ws_status req_new(ws_comm *c, ws_comm_request **req, const char *what,
                         const ws_tensor *const *ts, int n, int outs, ws_comm_request **r)
{
    *r = NULL;
    if (!req) return WS_OK;
    *req = NULL;
    ws_comm_request *q = ws_calloc(1, sizeof *q);
    if (!q) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory for a request", what);
    q->comm = c;
    q->what = what;
    q->ops = &ws_comm_self_ops()->data;
    char holder[96];
    snprintf(holder, sizeof holder, "an async %s (wait for its request first)", what);
    for (int i = 0; i < n; i++) {
        q->keep[i] = *ts[i];
        q->keep[i].name = NULL;
        ws_storage *s = q->keep[i].storage;
        ws_storage_retain(s);
        /* The backend may read or write these bytes until wait: the pool
         * must stay mapped until then. */
        if (s->kind == WS_STORAGE_POOL) ws_pool_hold(s->pool, holder);
    }
    q->n_keep = n;
    q->written_mask = outs;
    *r = q;
    return WS_OK;
}

static void req_release(ws_comm_request *q)
{
    for (int i = 0; i < q->n_keep; i++) {
        ws_storage *s = q->keep[i].storage;
        if (s->kind == WS_STORAGE_POOL) ws_pool_unhold(s->pool);
        ws_storage_release(s);
    }
    ws_tensor_free(&q->unpack.staging);
    free(q->unpack.dsts);
    free(q);
}

static ws_status req_complete(ws_comm_request *q, ws_status rc)
{
    if (rc == WS_OK)
        for (int i = 0; i < q->n_keep; i++)
            if (q->written_mask & (1 << i)) ws_tensor_mark_written(&q->keep[i]);
    if (rc == WS_OK && q->unpack.dsts) {
        rc = ws_unpack(&q->unpack.staging, q->unpack.dsts, q->unpack.n, NULL);
        if (rc != WS_OK) ws_errprefix("%s into a list", q->what);
    }
    return rc;
}

/* After issuing: blocking calls are done; async ones hand the request out.
 * An async call that failed to issue still completes what it posted. */
static ws_status finish(ws_comm_request *q, ws_comm_request **req, ws_status rc,
                        const ws_tensor *out)
{
    if (!q) {
        if (rc == WS_OK && out) ws_tensor_mark_written(out);
        return rc;
    }
    if (rc != WS_OK) {
        /* Keep the first error: completing the posted part may set another. */
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", ws_errmsg());
        q->ops->wait(q);
        req_release(q);
        return WS_ERR(rc, "%s", msg);
    }
    *req = q;
    return WS_OK;
}

/* What a collective runs with: the device, its backend and, for an async
 * call, the request. */
typedef struct call {
    ws_device *d;
    const ws_comm_ops *ops;
    ws_comm_request *q;
} call;

/* Picks the backend for the device of ts[0] and makes the request of an
 * async call; ts and outs are as for req_new. */
static ws_status begin(ws_comm *c, ws_comm_request **req, const char *what,
                       const ws_tensor *const *ts, int n, int outs, call *k)
{
    k->d = ws_tensor_device(ts[0]);
    WS_TRY(pick(c, k->d, &k->ops));
    WS_TRY(req_new(c, req, what, ts, n, outs, &k->q));
    if (k->q) k->q->ops = k->ops;
    return WS_OK;
}

/* The send and recv of all_gather (gather = 1: recv holds one send per rank)
 * or reduce_scatter (gather = 0: send holds one recv per rank). */
static ws_status check_per_rank(ws_comm *c, const char *what, const ws_tensor *send,
                                const ws_tensor *recv, int gather, void **sp, void **rp)
{
    char role[64];
    WS_TRY(usable(c, what));
    snprintf(role, sizeof role, "%s send", what);
    WS_TRY(check_t(send, role, WS_ACCESS_READ, sp));
    snprintf(role, sizeof role, "%s recv", what);
    WS_TRY(check_t(recv, role, WS_ACCESS_WRITE, rp));
    WS_TRY(same_device(send, recv, what));
    const ws_tensor *whole = gather ? recv : send, *piece = gather ? send : recv;
    int64_t n = ws_tensor_numel(piece);
    if (send->dtype != recv->dtype || ws_tensor_numel(whole) != n * c->size) {
        char bw[160], bp[160];
        return WS_ERR(WS_ERR_ARG, "%s: %s %s must have %d x %lld elements of %s (the %s %s), it "
                      "has %lld of %s", what, gather ? "recv" : "send",
                      ws_tensor_label(whole, bw, sizeof bw), c->size, (long long)n,
                      ws_dtype_name(piece->dtype), gather ? "send" : "recv",
                      ws_tensor_label(piece, bp, sizeof bp), (long long)ws_tensor_numel(whole),
                      ws_dtype_name(whole->dtype));
    }
    return WS_OK;
}

ws_status ws_comm_wait(ws_comm_request *q)
{
    if (!q) return WS_ERR(WS_ERR_ARG, "wait: no request");
    ws_status rc = q->ops->wait(q);
    rc = req_complete(q, rc);
    req_release(q);
    return rc;
}

ws_status ws_comm_all_gather(ws_comm *c, const ws_tensor *send, ws_tensor *recv,
                             ws_comm_request **req)
{
    const char *what = "all_gather";
    void *sp, *rp;
    WS_TRY(check_per_rank(c, what, send, recv, 1, &sp, &rp));
    int64_t v[N_CHECK] = {K_ALL_GATHER, ws_tensor_numel(send), send->dtype, 0};
    WS_TRY(agree(c, what, v, "send size", NULL));
    call k;
    WS_TRY(begin(c, req, what, (const ws_tensor *const[]){recv, send}, 2, 1, &k));
    ws_status rc = k.ops->all_gather(c, k.d, sp, rp, ws_tensor_nbytes(send), k.q);
    return finish(k.q, req, rc, recv);
}

/* recvs[i] (i = 0..size-1) are consecutive slices of one buffer: gather directly. */
static int adjacent(ws_tensor *const *recvs, size_t n)
{
    size_t bytes = ws_tensor_nbytes(recvs[0]);
    for (size_t i = 1; i < n; i++)
        if (recvs[i]->storage != recvs[0]->storage ||
            recvs[i]->offset != recvs[0]->offset + i * bytes)
            return 0;
    return 1;
}

ws_status ws_comm_all_gather_list(ws_comm *c, const ws_tensor *send, ws_tensor *const *recvs,
                                  size_t n, ws_comm_request **req)
{
    const char *what = "all_gather";
    WS_TRY(usable(c, what));
    void *ptr;
    WS_TRY(check_t(send, "all_gather send", WS_ACCESS_READ, &ptr));
    if (n != (size_t)c->size)
        return WS_ERR(WS_ERR_ARG, "all_gather: the recv list has %zu tensors; it needs one per "
                      "rank (%d)", n, c->size);
    char bs[160], br[160];
    for (size_t i = 0; i < n; i++) {
        WS_TRY(check_t(recvs[i], "all_gather recv", WS_ACCESS_WRITE, &ptr));
        WS_TRY(same_device(send, recvs[i], what));
        if (recvs[i]->dtype != send->dtype || ws_tensor_numel(recvs[i]) != ws_tensor_numel(send))
            return WS_ERR(WS_ERR_ARG, "all_gather: recv[%zu] %s must match the send %s (%lld "
                          "elements of %s)", i + 1, ws_tensor_label(recvs[i], br, sizeof br),
                          ws_tensor_label(send, bs, sizeof bs), (long long)ws_tensor_numel(send),
                          ws_dtype_name(send->dtype));
    }
    ws_device *d = ws_tensor_device(send);
    int64_t numel = ws_tensor_numel(send);
    if (adjacent(recvs, n)) {
        /* One view over all pieces: no staging copy. */
        ws_tensor whole = *recvs[0];
        whole.name = NULL;
        ws_layout_contiguous(&whole.layout, 1, (int64_t[]){numel * (int64_t)n});
        ws_status rc = ws_comm_all_gather(c, send, &whole, req);
        if (rc == WS_OK && !req)
            for (size_t i = 0; i < n; i++) ws_tensor_mark_written(recvs[i]);
        return rc;
    }
    ws_tensor staging = {0};
    ws_tensor_opts o = {.device = d, .name = "all_gather staging"};
    WS_TRY(ws_tensor_empty(&staging, send->dtype, 1, (int64_t[]){numel * (int64_t)n}, &o));
    ws_status rc = ws_comm_all_gather(c, send, &staging, req);
    if (rc != WS_OK) {
        ws_tensor_free(&staging);
        return rc;
    }
    if (!req) {
        rc = ws_unpack(&staging, recvs, n, NULL);
        ws_tensor_free(&staging);
        return rc;
    }
    ws_comm_request *q = *req;
    q->unpack.dsts = ws_malloc(n * sizeof *q->unpack.dsts);
    if (!q->unpack.dsts) {
        ws_comm_wait(q);
        *req = NULL;
        ws_tensor_free(&staging);
        return WS_ERR(WS_ERR_NOMEM, "all_gather: out of host memory");
    }
    memcpy(q->unpack.dsts, recvs, n * sizeof *recvs);
    q->unpack.n = n;
    q->unpack.staging = staging; /* the request owns it now */
    return WS_OK;
}

ws_status ws_comm_broadcast(ws_comm *c, ws_tensor *t, int root, ws_comm_request **req)
{
    const char *what = "broadcast";
    WS_TRY(usable(c, what));
    void *ptr;
    WS_TRY(check_t(t, "broadcast", c->rank == root ? WS_ACCESS_READ : WS_ACCESS_WRITE, &ptr));
    /* The root is range-checked after the ranks agree on it: a rank that
     * alone has a bad root must not leave the others waiting in the check. */
    int64_t v[N_CHECK] = {K_BROADCAST, ws_tensor_numel(t), t->dtype, root};
    WS_TRY(agree(c, what, v, "size", "root"));
    if (root < 0 || root >= c->size)
        return WS_ERR(WS_ERR_ARG, "broadcast: root %d is out of range; ranks are 0..%d", root,
                      c->size - 1);
    call k;
    WS_TRY(begin(c, req, what, (const ws_tensor *const[]){t}, 1, c->rank == root ? 0 : 1, &k));
    ws_status rc = k.ops->broadcast(c, k.d, ptr, ws_tensor_nbytes(t), root, k.q);
    return finish(k.q, req, rc, c->rank == root ? NULL : t);
}

static ws_status check_peer(ws_comm *c, int peer, const char *what)
{
    if (peer < 0 || peer >= c->size)
        return WS_ERR(WS_ERR_ARG, "%s: peer %d is out of range; ranks are 0..%d", what, peer,
                      c->size - 1);
    if (peer == c->rank)
        return WS_ERR(WS_ERR_ARG, "%s: peer %d is this rank; send to or receive from another "
                      "rank", what, peer);
    return WS_OK;
}

/* send and recv: `written` is the tensor a recv fills, NULL for a send. */
static ws_status point_to_point(ws_comm *c, const ws_tensor *t, int peer,
                                ws_comm_request **req, ws_tensor *written)
{
    const char *what = written ? "recv" : "send";
    WS_TRY(usable(c, what));
    WS_TRY(check_peer(c, peer, what));
    void *ptr;
    WS_TRY(check_t(t, what, written ? WS_ACCESS_WRITE : WS_ACCESS_READ, &ptr));
    call k;
    WS_TRY(begin(c, req, what, (const ws_tensor *const[]){t}, 1, written != NULL, &k));
    ws_status rc = written ? k.ops->recv(c, k.d, ptr, ws_tensor_nbytes(t), peer, k.q)
                           : k.ops->send(c, k.d, ptr, ws_tensor_nbytes(t), peer, k.q);
    return finish(k.q, req, rc, written);
}

ws_status ws_comm_send(ws_comm *c, const ws_tensor *t, int peer, ws_comm_request **req)
{
    return point_to_point(c, t, peer, req, NULL);
}

ws_status ws_comm_recv(ws_comm *c, ws_tensor *t, int peer, ws_comm_request **req)
{
    return point_to_point(c, t, peer, req, t);
}

static ws_status check_op(ws_reduce_op op, const char *what)
{
    if (op == WS_REDUCE_SUM || op == WS_REDUCE_MAX) return WS_OK;
    return WS_ERR(WS_ERR_ARG, "%s: op %d is not a reduction; use WS_REDUCE_SUM or WS_REDUCE_MAX",
                  what, (int)op);
}

ws_status ws_comm_all_reduce(ws_comm *c, ws_tensor *t, ws_reduce_op op, ws_comm_request **req)
{
    const char *what = "all_reduce";
    WS_TRY(usable(c, what));
    WS_TRY(check_op(op, what));
    void *ptr;
    WS_TRY(check_t(t, what, WS_ACCESS_READ | WS_ACCESS_WRITE, &ptr));
    int64_t v[N_CHECK] = {K_ALL_REDUCE, ws_tensor_numel(t), t->dtype, op};
    WS_TRY(agree(c, what, v, "size", "op (0 sum, 1 max)"));
    call k;
    WS_TRY(begin(c, req, what, (const ws_tensor *const[]){t}, 1, 1, &k));
    ws_status rc = k.ops->all_reduce(c, k.d, ptr, (size_t)ws_tensor_numel(t), t->dtype, op, k.q);
    return finish(k.q, req, rc, t);
}

ws_status ws_comm_reduce_scatter(ws_comm *c, const ws_tensor *send, ws_tensor *recv,
                                 ws_reduce_op op, ws_comm_request **req)
{
    const char *what = "reduce_scatter";
    void *sp, *rp;
    WS_TRY(check_per_rank(c, what, send, recv, 0, &sp, &rp));
    WS_TRY(check_op(op, what));
    int64_t n = ws_tensor_numel(recv);
    if (c->size > 1) WS_TRY(check_apart(send, recv, what));
    int64_t v[N_CHECK] = {K_REDUCE_SCATTER, n, send->dtype, op};
    WS_TRY(agree(c, what, v, "recv size", "op (0 sum, 1 max)"));
    call k;
    WS_TRY(begin(c, req, what, (const ws_tensor *const[]){recv, send}, 2, 1, &k));
    ws_status rc = k.ops->reduce_scatter(c, k.d, sp, rp, (size_t)n, send->dtype, op, k.q);
    return finish(k.q, req, rc, recv);
}

/* Every (displacement, count) of one side lies inside its tensor. */
static ws_status check_spans(ws_comm *c, const ws_tensor *t, const size_t *counts,
                             const size_t *displs, const char *side)
{
    size_t have = ws_tensor_nbytes(t);
    for (int q = 0; q < c->size; q++)
        if (displs[q] > have || counts[q] > have - displs[q]) {
            char b[160];
            return WS_ERR(WS_ERR_ARG, "all_to_all: %s bytes [%zu, %zu) for rank %d lie outside "
                          "%s (%zu bytes)", side, displs[q], displs[q] + counts[q], q,
                          ws_tensor_label(t, b, sizeof b), have);
        }
    return WS_OK;
}

/* Rank s's send_counts[q] must be rank q's recv_counts[s]: the ranks swap
 * their counts (one small all-to-all) and agree on whether any pair differs,
 * so every rank fails together instead of some waiting for bytes that never
 * come. */
static ws_status agree_counts(ws_comm *c, const char *what, const size_t *send_counts,
                              const size_t *recv_counts)
{
    int64_t *buf = malloc(2 * (size_t)c->size * sizeof *buf);
    if (!buf) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory for the count check", what);
    int64_t *mine = buf, *theirs = buf + c->size;
    for (int q = 0; q < c->size; q++) mine[q] = (int64_t)send_counts[q];
    ws_status rc = c->host->exchange_i64(c, mine, theirs);
    int64_t bad[1] = {0};
    int peer = -1;
    for (int q = 0; rc == WS_OK && q < c->size && peer < 0; q++)
        if (theirs[q] != (int64_t)recv_counts[q]) peer = q;
    if (peer >= 0) bad[0] = (int64_t)c->rank * c->size + peer + 1;
    if (rc == WS_OK) rc = ws_comm_max_i64(c, bad, 1);
    if (rc == WS_OK && peer >= 0)
        rc = WS_ERR(WS_ERR_ARG, "%s: rank %d expects %zu bytes from rank %d, which sends it "
                    "%lld; every rank's send count for a peer must be that peer's recv count "
                    "for it", what, c->rank, recv_counts[peer], peer, (long long)theirs[peer]);
    else if (rc == WS_OK && bad[0] > 0)
        rc = WS_ERR(WS_ERR_ARG, "%s: rank %lld expects a different byte count from rank %lld "
                    "than that rank sends it; every rank's send count for a peer must be that "
                    "peer's recv count for it", what, (long long)((bad[0] - 1) / c->size),
                    (long long)((bad[0] - 1) % c->size));
    free(buf);
    return rc;
}

ws_status ws_comm_all_to_all(ws_comm *c, const ws_tensor *send, const size_t *send_counts,
                             const size_t *send_displs, ws_tensor *recv,
                             const size_t *recv_counts, const size_t *recv_displs,
                             ws_comm_request **req)
{
    const char *what = "all_to_all";
    void *sp, *rp;
    WS_TRY(usable(c, what));
    WS_TRY(check_t(send, "all_to_all send", WS_ACCESS_READ, &sp));
    WS_TRY(check_t(recv, "all_to_all recv", WS_ACCESS_WRITE, &rp));
    WS_TRY(same_device(send, recv, what));
    WS_TRY(check_apart(send, recv, what));
    WS_TRY(check_spans(c, send, send_counts, send_displs, "send"));
    WS_TRY(check_spans(c, recv, recv_counts, recv_displs, "recv"));
    int64_t v[N_CHECK] = {K_ALL_TO_ALL, 0, 0, 0};
    WS_TRY(agree(c, what, v, "size", NULL));
    if (c->check) WS_TRY(agree_counts(c, what, send_counts, recv_counts));
    call k;
    WS_TRY(begin(c, req, what, (const ws_tensor *const[]){recv, send}, 2, 1, &k));
    ws_status rc = k.ops->all_to_all(c, k.d, sp, send_counts, send_displs, rp, recv_counts,
                                     recv_displs, k.q);
    return finish(k.q, req, rc, recv);
}

int ws_comm_can_transfer(const ws_comm *c, const ws_device *d)
{
    return c->size > 1 && d->kind == WS_DEVICE_CPU && c->host->data.transfer != NULL;
}

/* A message's runs add up to its bytes, its peer is another rank, and
 * scattered runs stay within what one MPI message can carry. */
static ws_status check_msg(const ws_comm *c, const ws_comm_msg *g, size_t i, size_t *per_peer)
{
    const char *what = "transfer";
    if (g->peer < 0 || g->peer >= c->size || g->peer == c->rank)
        return WS_ERR(WS_ERR_ARG, "%s: message %zu names rank %d; a message goes to another "
                      "rank of %d", what, i + 1, g->peer, c->size);
    if (g->n_runs == 0 || !g->runs)
        return WS_ERR(WS_ERR_ARG, "%s: message %zu has no runs", what, i + 1);
    if (!g->scattered && g->n_runs != 1)
        return WS_ERR(WS_ERR_ARG, "%s: message %zu has %zu runs but is not scattered", what,
                      i + 1, g->n_runs);
    size_t sum = 0;
    for (size_t j = 0; j < g->n_runs; j++) {
        if (!g->runs[j].ptr && g->runs[j].bytes)
            return WS_ERR(WS_ERR_ARG, "%s: run %zu of message %zu has no memory", what, j + 1,
                          i + 1);
        sum += g->runs[j].bytes;
    }
    if (sum != g->bytes)
        return WS_ERR(WS_ERR_ARG, "%s: message %zu's runs hold %zu bytes, not its %zu", what,
                      i + 1, sum, g->bytes);
    if (g->scattered && g->bytes > (size_t)0x7fffffff)
        return WS_ERR(WS_ERR_ARG, "%s: message %zu of %zu bytes over %zu runs; scattered runs "
                      "must hold under 2 GiB", what, i + 1, g->bytes, g->n_runs);
    per_peer[g->peer] += g->bytes;
    return WS_OK;
}

ws_status ws_comm_transfer(ws_comm *c, ws_device *d, const ws_comm_msg *msgs, size_t n,
                           ws_comm_request **req)
{
    const char *what = "transfer";
    WS_TRY(usable(c, what));
    if (!ws_comm_can_transfer(c, d))
        return WS_ERR(WS_ERR_UNSUPPORTED, "%s: %s cannot send %s memory point to point in a "
                      "world of %d", what, c->backend, d->name, c->size);
    size_t *tot = ws_calloc(2 * (size_t)c->size, sizeof *tot);
    if (!tot) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory for the byte counts", what);
    ws_status rc = WS_OK;
    for (size_t i = 0; i < n && rc == WS_OK; i++)
        rc = check_msg(c, &msgs[i], i, tot + (msgs[i].send ? 0 : (size_t)c->size));
    /* With the check on, a rank whose messages are wrong still takes part in
     * the agreement (the one every checked collective runs), so the others
     * fail with it instead of waiting; it keeps its own message. */
    int64_t v[N_CHECK] = {K_TRANSFER, 0, 0, rc != WS_OK};
    if (rc != WS_OK) {
        char own[512];
        snprintf(own, sizeof own, "%s", ws_errmsg());
        (void)agree(c, what, v, "size", NULL);
        free(tot);
        return WS_ERR(rc, "%s", own);
    }
    rc = agree(c, what, v, "size",
               "validity of their messages (1: wrong, see that rank's message)");
    if (rc == WS_OK && c->check) rc = agree_counts(c, what, tot, tot + c->size);
    free(tot);
    WS_TRY(rc);
    call k = {.d = d, .ops = &c->host->data};
    WS_TRY(req_new(c, req, what, NULL, 0, 0, &k.q));
    if (k.q) k.q->ops = k.ops;
    rc = k.ops->transfer(c, d, msgs, n, k.q);
    return finish(k.q, req, rc, NULL);
}

ws_status ws_comm_barrier(ws_comm *c)
{
    WS_TRY(usable(c, "barrier"));
    if (c->size == 1) return WS_OK;
    /* With checking on, the check's all-reduce is itself the barrier: no rank
     * leaves it before every rank has entered. */
    if (c->check) {
        int64_t v[N_CHECK] = {K_BARRIER, 0, 0, 0};
        return agree(c, "barrier", v, "size", NULL);
    }
    return c->host->barrier(c);
}

/* ---- reference timing, abort, shutdown ------------------------------------- */

ws_status ws_comm_reference(ws_comm *c, const char *op, size_t bytes, int iters,
                            double *seconds_per_iter)
{
    return c->host->reference(c, op, bytes, iters, seconds_per_iter);
}

void ws_comm_abort(int exit_code)
{
    fflush(NULL);
    ws_nccl_abort_all();
    if (g_host) g_host->abort(exit_code);
    /* A world of one (or the backend's abort returned): end this process only. */
    _exit(exit_code ? exit_code : 1);
}

void ws_comm_shutdown(void)
{
    if (g_shut) return;
    g_shut = 1;
    if (!g_world_ready) return;
    ws_nccl_destroy(&g_world);
    ws_comm_unwatch_peers();
    g_world.host->free(&g_world);
    g_world.host->finalize();
}
