/* comm_mpi.c: the MPI backend for cpu tensors, and the MPI world itself.
 *
 * Also carries the world's control traffic: the NCCL bootstrap (broadcast of
 * its unique id) and the cheap mismatch check of comm.c. MPI counts are ints, so transfers are cut into
 * chunks of at most `chunk_bytes` (1 GiB, WSHOST_COMM_CHUNK_BYTES overrides it
 * for tests); an all_gather chunk uses a datatype whose extent is the whole
 * per-rank piece so each chunk still lands at the right place for every rank.
 *
 * bf16, f16 and fp8 reductions go through an f32 scratch buffer: each rank
 * converts to f32, MPI reduces in f32, and the result is rounded back once
 * (round to nearest even). That is more accurate than summing in the narrow
 * type and identical on every rank, but costs a temporary of 4 bytes per
 * element. i32 and i64 sums use unsigned MPI types, so they wrap modulo 2^32
 * and 2^64 as the checksums require. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_internal.h"
#include "env.h"

#define WS_MPI_TAG 0x5753

typedef struct mpi_comm_impl { MPI_Comm comm; } mpi_comm_impl;

static struct {
    int initialized;   /* we (or someone) called MPI_Init and we use it */
    int finalized;
    size_t chunk_bytes;
} g_mpi;

static MPI_Comm comm_of(const ws_comm *c) { return ((const mpi_comm_impl *)c->host_impl)->comm; }

static ws_status mpi_fail(const ws_comm *c, int rc, const char *file, int line, const char *what)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "error %d", rc);
    return ws_seterr(WS_ERR_COMM, file, line,
                     "%s: MPI failed on rank %d of %d: %s; a peer may have died or the ranks "
                     "called different collectives",
                     what, c ? c->rank : -1, c ? c->size : -1, msg);
}

#define CHECK_MPI(c, call, what)                                                          \
    do {                                                                                  \
        int check_mpi_rc_ = (call);                                                       \
        if (check_mpi_rc_ != MPI_SUCCESS)                                                 \
            return mpi_fail((c), check_mpi_rc_, __FILE__, __LINE__, (what));              \
    } while (0)

/* ---- requests ------------------------------------------------------------ */

typedef struct mpi_req {
    MPI_Request *reqs;
    int *expect;             /* bytes a recv request must deliver, -1 otherwise */
    int n, cap;
    float *scratch_in, *scratch_out; /* f32 reductions of narrow floats */
    void *convert_dst;       /* convert scratch_out back into this at completion */
    ws_dtype convert_dtype;
    size_t convert_count;
    int *counts;             /* an all_to_all's int counts and displacements, kept until done */
} mpi_req;

static void mpi_req_free(mpi_req *m)
{
    if (!m) return;
    free(m->reqs);
    free(m->expect);
    free(m->scratch_in);
    free(m->scratch_out);
    free(m->counts);
    free(m);
}

/* Slot for one more MPI_Request of an async call; NULL for a blocking call
 * (m == NULL), so each call site picks the blocking or nonblocking form. */
static ws_status mpi_req_push(mpi_req *m, int expect, MPI_Request **slot)
{
    *slot = NULL;
    if (!m) return WS_OK;
    if (m->n == m->cap) {
        int cap = m->cap ? m->cap * 2 : 4;
        MPI_Request *r = realloc(m->reqs, (size_t)cap * sizeof *r);
        if (!r) return WS_ERR(WS_ERR_NOMEM, "comm: out of host memory for MPI requests");
        m->reqs = r;
        int *e = realloc(m->expect, (size_t)cap * sizeof *e);
        if (!e) return WS_ERR(WS_ERR_NOMEM, "comm: out of host memory for MPI requests");
        m->expect = e;
        m->cap = cap;
    }
    m->expect[m->n] = expect;
    m->reqs[m->n] = MPI_REQUEST_NULL; /* harmless to wait on if the start fails */
    *slot = &m->reqs[m->n++];
    return WS_OK;
}

/* Backend state for an async call, created on first use. */
static ws_status async_state(ws_comm_request *req, mpi_req **out)
{
    *out = NULL;
    if (!req) return WS_OK;
    if (!req->impl) {
        req->impl = calloc(1, sizeof(mpi_req));
        if (!req->impl) return WS_ERR(WS_ERR_NOMEM, "comm: out of host memory for a request");
    }
    *out = req->impl;
    return WS_OK;
}

static ws_status finish_conversion(mpi_req *m)
{
    if (m->convert_dst)
        ws_convert_host(m->convert_dst, m->convert_dtype, m->scratch_out, WS_F32, m->convert_count);
    return WS_OK;
}

static ws_status mpi_wait(ws_comm_request *req)
{
    mpi_req *m = req->impl;
    ws_status rc = WS_OK;
    if (!m) return WS_OK;
    if (m->n > 0) {
        MPI_Status *st = calloc((size_t)m->n, sizeof *st);
        if (!st) {
            /* Still complete the requests: the buffers must not be freed under MPI. */
            MPI_Waitall(m->n, m->reqs, MPI_STATUSES_IGNORE);
            rc = WS_ERR(WS_ERR_NOMEM, "%s: out of host memory while waiting", req->what);
        } else {
            int mrc = MPI_Waitall(m->n, m->reqs, st);
            if (mrc != MPI_SUCCESS) {
                int err = mrc;
                for (int i = 0; mrc == MPI_ERR_IN_STATUS && i < m->n; i++)
                    if (st[i].MPI_ERROR != MPI_SUCCESS && st[i].MPI_ERROR != MPI_ERR_PENDING) {
                        err = st[i].MPI_ERROR;
                        break;
                    }
                rc = mpi_fail(req->comm, err, __FILE__, __LINE__, req->what);
            }
            for (int i = 0; rc == WS_OK && i < m->n; i++) {
                if (m->expect[i] < 0) continue;
                int got = 0;
                MPI_Get_count(&st[i], MPI_BYTE, &got);
                if (got != m->expect[i])
                    rc = WS_ERR(WS_ERR_COMM, "%s: rank %d expected %d bytes from rank %d but got "
                                "%d; send and recv sizes must match",
                                req->what, req->comm->rank, m->expect[i], st[i].MPI_SOURCE, got);
            }
            free(st);
        }
    }
    if (rc == WS_OK) rc = finish_conversion(m);
    mpi_req_free(m);
    req->impl = NULL;
    return rc;
}

/* A blocking call made of nonblocking parts posts them into a local request
 * (local_req), then completes them together (finish_local: the parts'
 * completion, or the posting's first error with its own message). */
static ws_status local_req(ws_comm *c, const char *what, ws_comm_request *local)
{
    *local = (ws_comm_request){.comm = c, .what = what};
    local->impl = calloc(1, sizeof(mpi_req));
    if (!local->impl) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory for a request", what);
    return WS_OK;
}

static ws_status finish_local(ws_comm_request *local, ws_status posted)
{
    char first[512];
    snprintf(first, sizeof first, "%s", posted == WS_OK ? "" : ws_errmsg());
    ws_status w = mpi_wait(local);
    return posted != WS_OK ? WS_ERR(posted, "%s", first) : w;
}

/* ---- data movement ------------------------------------------------------- */

static size_t chunk_of(size_t elem)
{
    size_t c = g_mpi.chunk_bytes / elem * elem;
    return c ? c : elem;
}

/* One chunk of a transfer: `len` units starting at unit `off`. It runs
 * blocking when m is NULL and otherwise adds its requests to m. */
typedef ws_status (*mpi_chunk_fn)(ws_comm *c, mpi_req *m, const void *arg, size_t off, int len);

/* Walks `total` units in chunks of at most `chunk` (so each count fits an
 * int). It always makes at least one call, so an empty transfer still
 * matches its peer's. */
static ws_status walk_chunks(ws_comm *c, mpi_req *m, size_t total, size_t chunk, mpi_chunk_fn fn,
                             const void *arg)
{
    size_t off = 0;
    do {
        int len = (int)(total - off < chunk ? total - off : chunk);
        WS_TRY(fn(c, m, arg, off, len));
        off += (size_t)len;
    } while (off < total);
    return WS_OK;
}

/* A byte transfer of an async (req) or blocking (req == NULL) call. */
static ws_status walk_bytes(ws_comm *c, ws_comm_request *req, size_t bytes, mpi_chunk_fn fn,
                            const void *arg)
{
    mpi_req *m;
    WS_TRY(async_state(req, &m));
    return walk_chunks(c, m, bytes, chunk_of(1), fn, arg);
}

typedef struct gather_arg {
    const void *send; /* MPI_IN_PLACE when the piece already sits in recv */
    void *recv;
    size_t bytes;     /* per rank */
} gather_arg;

static ws_status gather_chunk(ws_comm *c, mpi_req *m, const void *arg, size_t off, int len)
{
    const gather_arg *a = arg;
    const void *sb = a->send == MPI_IN_PLACE ? MPI_IN_PLACE : (const char *)a->send + off;
    char *rb = (char *)a->recv + off;
    MPI_Request *r;
    WS_TRY(mpi_req_push(m, -1, &r));
    if ((size_t)len == a->bytes) { /* the whole piece: plain byte counts */
        CHECK_MPI(c, r ? MPI_Iallgather(sb, len, MPI_BYTE, rb, len, MPI_BYTE, comm_of(c), r)
                       : MPI_Allgather(sb, len, MPI_BYTE, rb, len, MPI_BYTE, comm_of(c)),
                  "all_gather");
        return WS_OK;
    }
    /* A chunk: a type whose extent is the whole per-rank piece places each
     * rank's chunk at its offset within that rank's piece. */
    MPI_Datatype piece, spaced;
    CHECK_MPI(c, MPI_Type_contiguous(len, MPI_BYTE, &piece), "all_gather");
    int trc = MPI_Type_create_resized(piece, 0, (MPI_Aint)a->bytes, &spaced);
    MPI_Type_free(&piece);
    CHECK_MPI(c, trc, "all_gather");
    CHECK_MPI(c, MPI_Type_commit(&spaced), "all_gather");
    int mrc = r ? MPI_Iallgather(sb, len, MPI_BYTE, rb, 1, spaced, comm_of(c), r)
                : MPI_Allgather(sb, len, MPI_BYTE, rb, 1, spaced, comm_of(c));
    /* Freeing a type in use by a pending operation is allowed. */
    MPI_Type_free(&spaced);
    CHECK_MPI(c, mrc, "all_gather");
    return WS_OK;
}

static ws_status mpi_all_gather(ws_comm *c, ws_device *d, const void *send, void *recv,
                                size_t bytes, ws_comm_request *req)
{
    (void)d;
    /* In place when the caller's piece already sits in recv (FSDP style). */
    int in_place = (const char *)send == (const char *)recv + (size_t)c->rank * bytes;
    gather_arg a = {in_place ? MPI_IN_PLACE : send, recv, bytes};
    return walk_bytes(c, req, bytes, gather_chunk, &a);
}

typedef struct p2p_arg {
    void *buf;        /* broadcast, recv */
    const void *src;  /* send */
    int peer;         /* the root of a broadcast */
    int tag;          /* 0: WS_MPI_TAG */
} p2p_arg;

static ws_status broadcast_chunk(ws_comm *c, mpi_req *m, const void *arg, size_t off, int len)
{
    const p2p_arg *a = arg;
    char *p = (char *)a->buf + off;
    MPI_Request *r;
    WS_TRY(mpi_req_push(m, -1, &r));
    CHECK_MPI(c, r ? MPI_Ibcast(p, len, MPI_BYTE, a->peer, comm_of(c), r)
                   : MPI_Bcast(p, len, MPI_BYTE, a->peer, comm_of(c)), "broadcast");
    return WS_OK;
}

static ws_status send_chunk(ws_comm *c, mpi_req *m, const void *arg, size_t off, int len)
{
    const p2p_arg *a = arg;
    const char *p = (const char *)a->src + off;
    MPI_Request *r;
    WS_TRY(mpi_req_push(m, -1, &r));
    int tag = a->tag ? a->tag : WS_MPI_TAG;
    CHECK_MPI(c, r ? MPI_Isend(p, len, MPI_BYTE, a->peer, tag, comm_of(c), r)
                   : MPI_Send(p, len, MPI_BYTE, a->peer, tag, comm_of(c)), "send");
    return WS_OK;
}

static ws_status recv_chunk(ws_comm *c, mpi_req *m, const void *arg, size_t off, int len)
{
    const p2p_arg *a = arg;
    char *p = (char *)a->buf + off;
    MPI_Request *r;
    int tag = a->tag ? a->tag : WS_MPI_TAG;
    WS_TRY(mpi_req_push(m, len, &r));
    if (r) {
        /* mpi_wait checks the size received. */
        CHECK_MPI(c, MPI_Irecv(p, len, MPI_BYTE, a->peer, tag, comm_of(c), r), "recv");
        return WS_OK;
    }
    MPI_Status st;
    CHECK_MPI(c, MPI_Recv(p, len, MPI_BYTE, a->peer, tag, comm_of(c), &st), "recv");
    int got = 0;
    MPI_Get_count(&st, MPI_BYTE, &got);
    if (got != len)
        return WS_ERR(WS_ERR_COMM, "recv: rank %d expected %d bytes from rank %d but "
                      "got %d; send and recv sizes must match", c->rank, len, a->peer, got);
    return WS_OK;
}

static ws_status mpi_broadcast(ws_comm *c, ws_device *d, void *buf, size_t bytes, int root,
                               ws_comm_request *req)
{
    (void)d;
    p2p_arg a = {buf, NULL, root, 0};
    return walk_bytes(c, req, bytes, broadcast_chunk, &a);
}

static ws_status mpi_send(ws_comm *c, ws_device *d, const void *buf, size_t bytes, int peer,
                          ws_comm_request *req)
{
    (void)d;
    p2p_arg a = {NULL, buf, peer, 0};
    return walk_bytes(c, req, bytes, send_chunk, &a);
}

static ws_status mpi_recv(ws_comm *c, ws_device *d, void *buf, size_t bytes, int peer,
                          ws_comm_request *req)
{
    (void)d;
    p2p_arg a = {buf, NULL, peer, 0};
    return walk_bytes(c, req, bytes, recv_chunk, &a);
}

/* ---- all_to_all ------------------------------------------------------------ */

#define WS_MPI_A2A_TAG (WS_MPI_TAG + 1)

/* Counts and displacements that fit MPI's ints: one MPI_(I)alltoallv. */
static ws_status alltoallv_ints(ws_comm *c, mpi_req *m, const void *send, const size_t *sc,
                                const size_t *sd, void *recv, const size_t *rcn, const size_t *rd)
{
    int n = c->size;
    int *a = malloc(4 * (size_t)n * sizeof *a);
    if (!a) return WS_ERR(WS_ERR_NOMEM, "all_to_all: out of host memory for the counts");
    for (int q = 0; q < n; q++) {
        a[q] = (int)sc[q];
        a[n + q] = (int)sd[q];
        a[2 * n + q] = (int)rcn[q];
        a[3 * n + q] = (int)rd[q];
    }
    MPI_Request *r = NULL;
    ws_status rc = mpi_req_push(m, -1, &r);
    int mrc = MPI_SUCCESS;
    if (rc == WS_OK)
        mrc = r ? MPI_Ialltoallv(send, a, a + n, MPI_BYTE, recv, a + 2 * n, a + 3 * n, MPI_BYTE,
                                 comm_of(c), r)
                : MPI_Alltoallv(send, a, a + n, MPI_BYTE, recv, a + 2 * n, a + 3 * n, MPI_BYTE,
                                comm_of(c));
    /* MPI reads the arrays until a nonblocking call completes. */
    if (r && rc == WS_OK) {
        free(m->counts);
        m->counts = a;
    } else {
        free(a);
    }
    WS_TRY(rc);
    CHECK_MPI(c, mrc, "all_to_all");
    return WS_OK;
}

/* Larger pieces: every pair exchanges theirs in chunks, point to point. */
static ws_status alltoallv_chunks(ws_comm *c, mpi_req *m, const void *send, const size_t *sc,
                                  const size_t *sd, void *recv, const size_t *rcn,
                                  const size_t *rd)
{
    for (int q = 0; q < c->size; q++) {
        if (q == c->rank || rcn[q] == 0) continue;
        p2p_arg a = {(char *)recv + rd[q], NULL, q, WS_MPI_A2A_TAG};
        WS_TRY(walk_chunks(c, m, rcn[q], chunk_of(1), recv_chunk, &a));
    }
    for (int q = 0; q < c->size; q++) {
        if (q == c->rank || sc[q] == 0) continue;
        p2p_arg a = {NULL, (const char *)send + sd[q], q, WS_MPI_A2A_TAG};
        WS_TRY(walk_chunks(c, m, sc[q], chunk_of(1), send_chunk, &a));
    }
    if (sc[c->rank]) memcpy((char *)recv + rd[c->rank], (const char *)send + sd[c->rank],
                            sc[c->rank]);
    return WS_OK;
}

static ws_status mpi_all_to_all(ws_comm *c, ws_device *d, const void *send, const size_t *sc,
                                const size_t *sd, void *recv, const size_t *rcn, const size_t *rd,
                                ws_comm_request *req)
{
    (void)d;
    int fits = 1;
    for (int q = 0; q < c->size; q++)
        fits &= sc[q] <= g_mpi.chunk_bytes && rcn[q] <= g_mpi.chunk_bytes &&
                sd[q] <= (size_t)0x7fffffff && rd[q] <= (size_t)0x7fffffff;
    mpi_req *m;
    WS_TRY(async_state(req, &m));
    if (fits) return alltoallv_ints(c, m, send, sc, sd, recv, rcn, rd);
    if (m) return alltoallv_chunks(c, m, send, sc, sd, recv, rcn, rd);
    /* Blocking: the point-to-point pieces still run together, then complete. */
    ws_comm_request local;
    WS_TRY(local_req(c, "all_to_all", &local));
    return finish_local(&local, alltoallv_chunks(c, local.impl, send, sc, sd, recv, rcn, rd));
}

/* ---- transfer: point to point over scattered memory ------------------------ */

#define WS_MPI_XFER_TAG (WS_MPI_TAG + 2)

/* A scattered message: one MPI message whose datatype lists its runs'
 * absolute addresses, so MPI reads or writes them in place. Its size is
 * checked at completion as every recv's is (MPI_Get_count in bytes, which
 * Open MPI and MPICH give for a receive of any datatype built of bytes). */
static ws_status xfer_scattered(ws_comm *c, mpi_req *m, const ws_comm_msg *g)
{
    if (g->n_runs > (size_t)0x7fffffff)
        return WS_ERR(WS_ERR_ARG, "transfer: a message of %zu runs; at most 2^31 - 1", g->n_runs);
    int n = (int)g->n_runs;
    int *len = malloc((size_t)n * sizeof *len);
    MPI_Aint *at = malloc((size_t)n * sizeof *at);
    if (!len || !at) {
        free(len);
        free(at);
        return WS_ERR(WS_ERR_NOMEM, "transfer: out of host memory for a message of %d runs", n);
    }
    int mrc = MPI_SUCCESS;
    for (int i = 0; i < n && mrc == MPI_SUCCESS; i++) {
        len[i] = (int)g->runs[i].bytes;
        mrc = MPI_Get_address(g->runs[i].ptr, &at[i]);
    }
    MPI_Datatype t = MPI_DATATYPE_NULL;
    if (mrc == MPI_SUCCESS) mrc = MPI_Type_create_hindexed(n, len, at, MPI_BYTE, &t);
    free(len);
    free(at);
    CHECK_MPI(c, mrc, "transfer");
    mrc = MPI_Type_commit(&t);
    MPI_Request *r = NULL;
    ws_status rc = WS_OK;
    if (mrc == MPI_SUCCESS) rc = mpi_req_push(m, g->send ? -1 : (int)g->bytes, &r);
    if (mrc == MPI_SUCCESS && rc == WS_OK)
        mrc = g->send ? MPI_Isend(MPI_BOTTOM, 1, t, g->peer, WS_MPI_XFER_TAG, comm_of(c), r)
                      : MPI_Irecv(MPI_BOTTOM, 1, t, g->peer, WS_MPI_XFER_TAG, comm_of(c), r);
    /* MPI keeps what a pending message needs; the handle can go now. */
    MPI_Type_free(&t);
    WS_TRY(rc);
    CHECK_MPI(c, mrc, "transfer");
    return WS_OK;
}

static ws_status xfer_post(ws_comm *c, mpi_req *m, const ws_comm_msg *msgs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const ws_comm_msg *g = &msgs[i];
        if (g->scattered) {
            WS_TRY(xfer_scattered(c, m, g));
            continue;
        }
        /* One run: contiguous on this side, so MPI may copy it once, process
         * to process; chunked identically on both sides. */
        p2p_arg a = {g->runs[0].ptr, g->runs[0].ptr, g->peer, WS_MPI_XFER_TAG};
        WS_TRY(walk_chunks(c, m, g->bytes, chunk_of(1), g->send ? send_chunk : recv_chunk, &a));
    }
    return WS_OK;
}

static ws_status mpi_transfer(ws_comm *c, ws_device *d, const ws_comm_msg *msgs, size_t n,
                              ws_comm_request *req)
{
    (void)d;
    mpi_req *m;
    WS_TRY(async_state(req, &m));
    if (m) return xfer_post(c, m, msgs, n);
    /* Blocking: every message is posted, then all complete together. */
    ws_comm_request local;
    WS_TRY(local_req(c, "transfer", &local));
    return finish_local(&local, xfer_post(c, local.impl, msgs, n));
}

/* ---- reductions ------------------------------------------------------------ */

/* MPI type for a reduction, or MPI_DATATYPE_NULL when it goes through f32. */
static MPI_Datatype reduce_type(ws_dtype t, ws_reduce_op op)
{
    switch (t) {
    case WS_F32: return MPI_FLOAT;
    case WS_U8: return MPI_UINT8_T;
    case WS_I32: return op == WS_REDUCE_SUM ? MPI_UINT32_T : MPI_INT32_T;
    case WS_I64: return op == WS_REDUCE_SUM ? MPI_UINT64_T : MPI_INT64_T;
    default: return MPI_DATATYPE_NULL;
    }
}

/* The f32 scratch path: `send` (send_count elements of t) is converted into
 * scratch_in (or straight into scratch_out when reducing in place); the
 * result in scratch_out is converted back into dst at completion. */
static ws_status scratch_setup(mpi_req *m, const void *send, size_t send_count, void *dst,
                               size_t dst_count, ws_dtype t, int in_place, const char *what)
{
    m->scratch_out = malloc(dst_count * sizeof(float) + 1);
    if (!in_place) m->scratch_in = malloc(send_count * sizeof(float) + 1);
    if (!m->scratch_out || (!in_place && !m->scratch_in))
        return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory for the f32 scratch of a %s "
                      "reduction (%zu elements); reduce in f32 instead", what, ws_dtype_name(t),
                      send_count);
    ws_convert_host(in_place ? m->scratch_out : m->scratch_in, WS_F32, send, t, send_count);
    m->convert_dst = dst;
    m->convert_dtype = t;
    m->convert_count = dst_count;
    return WS_OK;
}

typedef struct reduce_arg {
    const void *send; /* == recv for an in-place all_reduce */
    void *recv;
    size_t count;     /* all_reduce: of the buffer; reduce_scatter: per rank */
    size_t elem;
    MPI_Datatype type;
    MPI_Op op;
} reduce_arg;

static ws_status reduce_chunk(ws_comm *c, mpi_req *m, const void *arg, size_t off, int len)
{
    const reduce_arg *a = arg;
    if (len == 0) return WS_OK; /* an empty all_reduce makes no MPI call */
    const void *sb = a->send == a->recv ? MPI_IN_PLACE : (const char *)a->send + off * a->elem;
    char *rb = (char *)a->recv + off * a->elem;
    MPI_Request *r;
    WS_TRY(mpi_req_push(m, -1, &r));
    CHECK_MPI(c, r ? MPI_Iallreduce(sb, rb, len, a->type, a->op, comm_of(c), r)
                   : MPI_Allreduce(sb, rb, len, a->type, a->op, comm_of(c)), "all_reduce");
    return WS_OK;
}

static ws_status scatter_chunk(ws_comm *c, mpi_req *m, const void *arg, size_t off, int len)
{
    const reduce_arg *a = arg;
    MPI_Request *r;
    if ((size_t)len == a->count) { /* whole blocks fit one int count */
        WS_TRY(mpi_req_push(m, -1, &r));
        CHECK_MPI(c, r ? MPI_Ireduce_scatter_block(a->send, a->recv, len, a->type, a->op,
                                                   comm_of(c), r)
                       : MPI_Reduce_scatter_block(a->send, a->recv, len, a->type, a->op,
                                                  comm_of(c)), "reduce_scatter");
        return WS_OK;
    }
    /* Blocks too large for one int count: reduce this chunk of block r to rank r. */
    for (int root = 0; root < c->size; root++) {
        const char *sb = (const char *)a->send + ((size_t)root * a->count + off) * a->elem;
        char *rb = root == c->rank ? (char *)a->recv + off * a->elem : NULL;
        WS_TRY(mpi_req_push(m, -1, &r));
        CHECK_MPI(c, r ? MPI_Ireduce(sb, rb, len, a->type, a->op, root, comm_of(c), r)
                       : MPI_Reduce(sb, rb, len, a->type, a->op, root, comm_of(c)),
                  "reduce_scatter");
    }
    return WS_OK;
}

/* What differs between all_reduce (in place on one buffer) and
 * reduce_scatter (a send of size blocks into a recv of one). */
typedef struct reduction {
    const char *what;
    mpi_chunk_fn chunk;
    int in_place;
} reduction;

static const reduction k_all_reduce = {"all_reduce", reduce_chunk, 1};
static const reduction k_reduce_scatter = {"reduce_scatter", scatter_chunk, 0};

/* `count` elements of recv: directly in MPI for the types it reduces, else
 * through the f32 scratch. */
static ws_status run_reduction(ws_comm *c, const reduction *k, const void *send, void *recv,
                               size_t count, ws_dtype t, ws_reduce_op op, ws_comm_request *req)
{
    MPI_Op mop = op == WS_REDUCE_SUM ? MPI_SUM : MPI_MAX;
    MPI_Datatype type = reduce_type(t, op);
    mpi_req *m;
    WS_TRY(async_state(req, &m));
    if (type != MPI_DATATYPE_NULL) {
        size_t elem = ws_dtype_size(t);
        reduce_arg a = {send, recv, count, elem, type, mop};
        return walk_chunks(c, m, count, chunk_of(elem) / elem, k->chunk, &a);
    }
    mpi_req local = {0};
    mpi_req *s = m ? m : &local;
    size_t send_count = k->in_place ? count : count * (size_t)c->size;
    ws_status rc = scratch_setup(s, send, send_count, recv, count, t, k->in_place, k->what);
    if (rc == WS_OK) {
        reduce_arg a = {k->in_place ? s->scratch_out : s->scratch_in, s->scratch_out, count,
                        sizeof(float), MPI_FLOAT, mop};
        rc = walk_chunks(c, m, count, chunk_of(sizeof(float)) / sizeof(float), k->chunk, &a);
    }
    if (!m) {
        if (rc == WS_OK) rc = finish_conversion(&local);
        free(local.scratch_in);
        free(local.scratch_out);
    }
    return rc;
}

static ws_status mpi_all_reduce(ws_comm *c, ws_device *d, void *buf, size_t count, ws_dtype t,
                                ws_reduce_op op, ws_comm_request *req)
{
    (void)d;
    return run_reduction(c, &k_all_reduce, buf, buf, count, t, op, req);
}

static ws_status mpi_reduce_scatter(ws_comm *c, ws_device *d, const void *send, void *recv,
                                    size_t count, ws_dtype t, ws_reduce_op op,
                                    ws_comm_request *req)
{
    (void)d;
    return run_reduction(c, &k_reduce_scatter, send, recv, count, t, op, req);
}

/* ---- world, split, small helpers ----------------------------------------- */

static int mpi_launched(void)
{
    const ws_launcher *l;
    ws_env_launcher(&l); /* comm.c reported any bad value before asking */
    return l->mpi;
}

static ws_status mpi_init_world(ws_comm *c)
{
    int inited = 0, provided = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) return mpi_fail(NULL, rc, __FILE__, __LINE__, "comm: MPI_Init_thread");
    }
    g_mpi.initialized = 1;
    WS_TRY(ws_env_comm_chunk_bytes(&g_mpi.chunk_bytes, (size_t)1 << 30, (size_t)1 << 30));
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    mpi_comm_impl *impl = calloc(1, sizeof *impl);
    if (!impl) return WS_ERR(WS_ERR_NOMEM, "comm: out of host memory for the world");
    impl->comm = MPI_COMM_WORLD;
    c->host_impl = impl;
    MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->size);
    /* The launcher's local rank; torchrun's LOCAL_RANK does not describe an
     * MPI job, so without an MPI or Slurm one the node's ranks are counted. */
    const ws_launcher *l;
    ws_env_launcher(&l);
    if (l->local_rank >= 0 && strcmp(l->local_var, "LOCAL_RANK") != 0) {
        c->local_rank = l->local_rank;
    } else {
        MPI_Comm node;
        CHECK_MPI(c, MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank,
                                         MPI_INFO_NULL, &node), "comm: local rank");
        MPI_Comm_rank(node, &c->local_rank);
        MPI_Comm_free(&node);
    }
    return WS_OK;
}

static ws_status mpi_split(ws_comm *parent, int color, int key, ws_comm *child, int *undefined)
{
    MPI_Comm out;
    CHECK_MPI(parent, MPI_Comm_split(comm_of(parent), color < 0 ? MPI_UNDEFINED : color, key, &out),
              "split");
    *undefined = out == MPI_COMM_NULL;
    if (*undefined) return WS_OK;
    mpi_comm_impl *impl = calloc(1, sizeof *impl);
    if (!impl) {
        MPI_Comm_free(&out);
        return WS_ERR(WS_ERR_NOMEM, "split: out of host memory");
    }
    MPI_Comm_set_errhandler(out, MPI_ERRORS_RETURN);
    impl->comm = out;
    child->host_impl = impl;
    MPI_Comm_rank(out, &child->rank);
    MPI_Comm_size(out, &child->size);
    return WS_OK;
}

static void mpi_free_comm(ws_comm *c)
{
    mpi_comm_impl *impl = c->host_impl;
    if (!impl) return;
    if (impl->comm != MPI_COMM_WORLD && !g_mpi.finalized) MPI_Comm_free(&impl->comm);
    free(impl);
    c->host_impl = NULL;
}

static ws_status mpi_barrier(ws_comm *c)
{
    CHECK_MPI(c, MPI_Barrier(comm_of(c)), "barrier");
    return WS_OK;
}

static ws_status mpi_max_i64(ws_comm *c, int64_t *v, int n)
{
    CHECK_MPI(c, MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_INT64_T, MPI_MAX, comm_of(c)), "check");
    return WS_OK;
}

static ws_status mpi_gather_i64(ws_comm *c, const int64_t *mine, int n, int64_t *all)
{
    CHECK_MPI(c, MPI_Allgather(mine, n, MPI_INT64_T, all, n, MPI_INT64_T, comm_of(c)), "check");
    return WS_OK;
}

static ws_status mpi_exchange_i64(ws_comm *c, const int64_t *send, int64_t *recv)
{
    CHECK_MPI(c, MPI_Alltoall(send, 1, MPI_INT64_T, recv, 1, MPI_INT64_T, comm_of(c)), "check");
    return WS_OK;
}

static ws_status mpi_bcast_bytes(ws_comm *c, void *buf, size_t bytes, int root)
{
    CHECK_MPI(c, MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, comm_of(c)), "nccl bootstrap");
    return WS_OK;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static ws_status mpi_reference(ws_comm *c, const char *op, size_t bytes, int iters,
                           double *seconds_per_iter)
{
    int gather = strcmp(op, "all_gather") == 0, a2a = strcmp(op, "all_to_all") == 0;
    if (!gather && !a2a && strcmp(op, "broadcast") != 0)
        return WS_ERR(WS_ERR_ARG, "reference: unknown op '%s'; use \"all_gather\", "
                      "\"broadcast\" or \"all_to_all\"", op);
    size_t piece = gather || a2a ? bytes / (size_t)c->size : bytes;
    /* An all_to_all sends as much as it receives. */
    size_t send_bytes = a2a ? bytes : piece;
    if (iters < 1 || piece > (size_t)0x7fffffff || ((gather || a2a) && bytes % (size_t)c->size))
        return WS_ERR(WS_ERR_ARG, "reference: %s of %zu bytes x %d iterations: bytes must be a "
                      "multiple of the world size and each piece under 2 GiB, iters >= 1", op,
                      bytes, iters);
    char *send = malloc(send_bytes ? send_bytes : 1), *recv = malloc(bytes ? bytes : 1);
    if (!send || !recv) {
        free(send);
        free(recv);
        return WS_ERR(WS_ERR_NOMEM, "reference: out of host memory for %zu bytes", bytes);
    }
    memset(send, c->rank + 1, send_bytes);
    memset(recv, 0, bytes);
    MPI_Comm comm = comm_of(c);
    int rc = MPI_SUCCESS;
    double t0 = 0;
    for (int i = -1; i < iters && rc == MPI_SUCCESS; i++) { /* i = -1: warm-up */
        if (i == 0) {
            rc = MPI_Barrier(comm);
            t0 = now_s();
        }
        if (rc != MPI_SUCCESS) break;
        rc = gather ? MPI_Allgather(send, (int)piece, MPI_BYTE, recv, (int)piece, MPI_BYTE, comm)
             : a2a  ? MPI_Alltoall(send, (int)piece, MPI_BYTE, recv, (int)piece, MPI_BYTE, comm)
                    : MPI_Bcast(recv, (int)bytes, MPI_BYTE, 0, comm);
    }
    double t = (now_s() - t0) / iters;
    free(send);
    free(recv);
    CHECK_MPI(c, rc, "reference");
    CHECK_MPI(c, MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, comm), "reference");
    *seconds_per_iter = t;
    return WS_OK;
}

static int mpi_active(void) { return g_mpi.initialized && !g_mpi.finalized; }

static void mpi_abort(int exit_code)
{
    if (mpi_active()) MPI_Abort(MPI_COMM_WORLD, exit_code);
}

static void mpi_finalize(void)
{
    if (!mpi_active()) return;
    g_mpi.finalized = 1;
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Finalize();
}

const ws_comm_host_ops ws_comm_mpi_ops = {
    .data = {
        .name = "mpi",
        .all_gather = mpi_all_gather,
        .broadcast = mpi_broadcast,
        .send = mpi_send,
        .recv = mpi_recv,
        .all_reduce = mpi_all_reduce,
        .reduce_scatter = mpi_reduce_scatter,
        .all_to_all = mpi_all_to_all,
        .wait = mpi_wait,
        .transfer = mpi_transfer,
    },
    .launched = mpi_launched,
    .init_world = mpi_init_world,
    .split = mpi_split,
    .free = mpi_free_comm,
    .barrier = mpi_barrier,
    .max_i64 = mpi_max_i64,
    .gather_i64 = mpi_gather_i64,
    .exchange_i64 = mpi_exchange_i64,
    .bcast_bytes = mpi_bcast_bytes,
    .reference = mpi_reference,
    .abort = mpi_abort,
    .finalize = mpi_finalize,
    .launch_hint = "has no MPI launch environment (no PMI_RANK or PMIX_RANK); start it with "
                   "mpirun, or srun --mpi=pmix (or --mpi=pmi2)",
};
