/* sender.c: the trainer side of remote.h.
 *
 * Two slots alternate: ws_sender_bucket packs into the slot whose previous
 * bucket was acknowledged longest ago, sends, and returns, so the caller
 * gathers and packs the next bucket while the receiver copies this one.
 * Checksums are summed per tensor while packing (the checksum composes over
 * element ranges), so FINISH costs no second pass over the weights.
 *
 * A caller that packs by itself takes a slot's mapping (ws_sender_slot),
 * writes into it and hands the laid-out pieces over (ws_sender_submit); it
 * then brings its own proofs to ws_sender_finish_proven.
 *
 * An error that leaves the two sides out of step (the receiver died, stopped
 * answering, or refused a bucket) breaks the sender: every later call says
 * so, and only ws_sender_close remains. A refused manifest or a failed wake
 * or sleep leaves it usable. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "chan.h"
#include "fault.h"
#include "remote.h"
#include "remote_wire.h"
#include "shm.h"

#define DEFAULT_TIMEOUT_MS 30000
#define DEFAULT_CONNECT_MS 10000
#define DEFAULT_SLOT_BYTES ((size_t)64 << 20)
#define CLOSE_SEND_MS 1000
#define CLOSE_WAIT_MS 2000 /* for a receiver to let go of GPU slots */

struct ws_sender {
    ws_sender_opts opts;
    char role[32];
    ws_chan *chan;
    int broken;
    char broken_why[512];
    ws_shm shm[WS_REMOTE_SLOTS];
    ws_tensor slot[WS_REMOTE_SLOTS]; /* host memfds or GPU memory alike: what the slots are */
    int slots_sent;
    int gpu_slots; /* the slots are GPU memory shared through CUDA IPC */
    int busy[WS_REMOTE_SLOTS];
    uint64_t busy_seq[WS_REMOTE_SLOTS];
    int next_slot;
    uint64_t next_seq, next_ack_seq;
    /* The sync under way. */
    int syncing;
    uint64_t version;
    size_t n;
    char **names;
    ws_dtype *dtypes;
    uint64_t *numels;
    uint64_t *sums;
    int submitted; /* a bucket of this sync came through ws_sender_submit: sums incomplete */
    ws_sender_stats stats;
    /* The receiver's shared memory (SHARED), mapped read-write: per chunk a
     * u8 tensor whose views keep it mapped, and per tensor where it is. */
    ws_tensor *chunks;
    size_t n_chunks;
    struct shared_tensor {
        char *name;
        uint32_t chunk;
        uint64_t offset, nbytes;
    } *shared;
    size_t n_shared;
};

/* A slot's memory, whichever kind: its tensor's data (a host mapping or a
 * device pointer) and size. */
static void slot_mem(const ws_sender *s, int slot, void **base, size_t *bytes)
{
    const ws_tensor *t = &s->slot[slot];
    *base = t->storage ? (char *)t->storage->data + t->offset : NULL;
    *bytes = t->storage ? ws_tensor_nbytes(t) : 0;
}

static void free_shared(ws_sender *s)
{
    for (size_t i = 0; i < s->n_chunks; i++) ws_tensor_free(&s->chunks[i]);
    for (size_t i = 0; i < s->n_shared; i++) free(s->shared[i].name);
    free(s->chunks);
    free(s->shared);
    s->chunks = NULL;
    s->shared = NULL;
    s->n_chunks = s->n_shared = 0;
}

/* One SHARED message: maps its chunks; the last one lists the tensors.
 * Returns 1 in *last when it was the last. */
static ws_status on_shared(ws_sender *s, ws_chan_msg *m, int *last)
{
    const char *peer = ws_chan_peer_label(s->chan);
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    uint32_t first = ws_rbuf_u32(&rb), n = ws_rbuf_u32(&rb);
    if (rb.bad || n > WS_CHAN_MAX_FDS || (int)n != m->nfds || first != s->n_chunks)
        return WS_ERR(WS_ERR_FORMAT, "sender: %s sent a malformed SHARED", peer);
    ws_tensor *c = ws_realloc(s->chunks, (s->n_chunks + n + 1) * sizeof *c);
    if (!c) return WS_ERR(WS_ERR_NOMEM, "sender: out of memory");
    s->chunks = c;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t bytes = ws_rbuf_u64(&rb);
        int fd = m->fds[i];
        m->fds[i] = -1; /* ws_shm_map_rw closes it */
        if (rb.bad) {
            close(fd);
            return WS_ERR(WS_ERR_FORMAT, "sender: %s sent a malformed SHARED", peer);
        }
        ws_shm shm;
        WS_TRY(ws_shm_map_rw(&shm, fd, (size_t)bytes, "the engine's shared weights"));
        ws_status rc = ws_shm_to_tensor(&shm, "the engine's shared weights",
                                        "engine's shared weights", &s->chunks[s->n_chunks]);
        if (rc != WS_OK) {
            ws_shm_free(&shm);
            return rc;
        }
        s->n_chunks++;
    }
    *last = ws_rbuf_u8(&rb) != 0;
    if (!*last) return rb.bad ? WS_ERR(WS_ERR_FORMAT, "sender: %s sent a malformed SHARED", peer)
                              : WS_OK;
    uint32_t k = ws_rbuf_u32(&rb);
    if (rb.bad || k > m->len)
        return WS_ERR(WS_ERR_FORMAT, "sender: %s sent a malformed SHARED", peer);
    s->shared = ws_calloc(k ? k : 1, sizeof *s->shared);
    if (!s->shared) return WS_ERR(WS_ERR_NOMEM, "sender: out of memory");
    for (uint32_t i = 0; i < k; i++) {
        const char *name = ws_rbuf_str(&rb);
        uint32_t chunk = ws_rbuf_u32(&rb);
        uint64_t off = ws_rbuf_u64(&rb), bytes = ws_rbuf_u64(&rb);
        if (rb.bad || chunk >= s->n_chunks ||
            off > (uint64_t)ws_tensor_nbytes(&s->chunks[chunk]) ||
            bytes > (uint64_t)ws_tensor_nbytes(&s->chunks[chunk]) - off)
            return WS_ERR(WS_ERR_FORMAT, "sender: %s sent a SHARED whose tensor %u lies outside "
                          "its memory", peer, i + 1);
        if (!(s->shared[i].name = ws_strdup(name)))
            return WS_ERR(WS_ERR_NOMEM, "sender: out of memory");
        s->shared[i].chunk = chunk;
        s->shared[i].offset = off;
        s->shared[i].nbytes = bytes;
        s->n_shared = i + 1;
    }
    return WS_OK;
}

/* Reads the SHARED messages that follow the receiver's greeting. */
static ws_status recv_shared(ws_sender *s)
{
    for (int last = 0; !last;) {
        ws_chan_msg m;
        WS_TRY(ws_chan_recv(s->chan, s->opts.timeout_ms, &m, "the shared memory"));
        ws_status rc = m.type == WS_MSG_SHARED
                           ? on_shared(s, &m, &last)
                           : WS_ERR(WS_ERR_FORMAT, "sender: %s sent %s instead of SHARED",
                                    ws_chan_peer_label(s->chan), ws_remote_msg_name(m.type));
        ws_chan_msg_free(&m);
        WS_TRY(rc);
    }
    return WS_OK;
}

size_t ws_sender_shared_count(const ws_sender *s) { return s->n_shared; }

ws_status ws_sender_shared(ws_sender *s, const char *name, ws_dtype dtype, int ndim,
                           const int64_t *shape, ws_tensor *out)
{
    memset(out, 0, sizeof *out);
    const struct shared_tensor *t = NULL;
    for (size_t i = 0; i < s->n_shared && !t; i++)
        if (strcmp(s->shared[i].name, name) == 0) t = &s->shared[i];
    if (!t)
        return WS_ERR(WS_ERR_ARG, "sender: %s shares no tensor '%s' (it was not made by "
                      "ws_receiver_alloc)", ws_chan_peer_label(s->chan), name);
    if ((unsigned)dtype >= WS_DTYPE_COUNT || ndim < 0 || ndim > WS_MAX_DIMS)
        return WS_ERR(WS_ERR_ARG, "sender: shared tensor '%s': bad dtype or dimensions", name);
    uint64_t numel = 1;
    for (int d = 0; d < ndim; d++) numel *= (uint64_t)(shape[d] > 0 ? shape[d] : 0);
    if (numel * ws_dtype_size(dtype) != t->nbytes)
        return WS_ERR(WS_ERR_ARG, "sender: shared tensor '%s' has %" PRIu64 " bytes in %s, not "
                      "the %" PRIu64 " of the shape asked for", name, t->nbytes,
                      ws_chan_peer_label(s->chan), numel * ws_dtype_size(dtype));
    ws_tensor bytes = {0}, typed = {0};
    ws_status rc = ws_tensor_narrow(&bytes, &s->chunks[t->chunk], 0, (int64_t)t->offset,
                                    (int64_t)t->nbytes);
    if (rc == WS_OK) rc = ws_tensor_view_dtype(&typed, &bytes, dtype);
    if (rc == WS_OK) rc = ws_tensor_reshape(out, &typed, ndim, shape);
    if (rc == WS_OK) rc = ws_tensor_set_name(out, name);
    ws_tensor_free(&bytes);
    ws_tensor_free(&typed);
    if (rc != WS_OK) ws_tensor_free(out);
    return rc;
}

static ws_status check_usable(ws_sender *s, const char *what)
{
    if (s->broken)
        return WS_ERR(WS_ERR_COMM, "%s: the connection to %s ended after an earlier error (%s); "
                      "close the sender and connect again", what, ws_chan_peer_label(s->chan),
                      s->broken_why);
    return WS_OK;
}

/* Marks the sender broken by the current error, and returns it. */
static ws_status fail(ws_sender *s, ws_status rc)
{
    if (rc != WS_OK && !s->broken) {
        s->broken = 1;
        snprintf(s->broken_why, sizeof s->broken_why, "%s", ws_errmsg());
    }
    return rc;
}

static void free_sync(ws_sender *s)
{
    for (size_t i = 0; s->names && i < s->n; i++) free(s->names[i]);
    free(s->names);
    free(s->dtypes);
    free(s->numels);
    free(s->sums);
    s->names = NULL;
    s->dtypes = NULL;
    s->numels = NULL;
    s->sums = NULL;
    s->n = 0;
    s->syncing = 0;
    s->submitted = 0;
}

pid_t ws_sender_peer_pid(const ws_sender *s) { return ws_chan_peer_pid(s->chan); }

size_t ws_sender_slot_bytes(const ws_sender *s) { return s->opts.slot_bytes; }

ws_device *ws_sender_slot_device(const ws_sender *s)
{
    return s->opts.slot_device ? s->opts.slot_device : ws_device_cpu();
}

ws_sender_stats ws_sender_get_stats(const ws_sender *s) { return s->stats; }

/* Waits for the reply to a request of `type`: ACK of that type, or ERROR
 * (then *refused, when given, is set: the receiver answered and said no). */
static ws_status wait_reply(ws_sender *s, uint32_t type, const char *what, ws_chan_msg *reply,
                            int *refused)
{
    ws_chan_msg m;
    if (refused) *refused = 0;
    WS_TRY(ws_chan_recv(s->chan, s->opts.timeout_ms, &m, what));
    ws_status rc = WS_OK;
    if (m.type == WS_MSG_ERROR) {
        if (refused) *refused = 1;
        rc = WS_ERR(WS_ERR_COMM, "%s: %s refused: %.*s", what, ws_chan_peer_label(s->chan),
                    (int)(m.len > 900 ? 900 : m.len), (const char *)m.payload);
    } else if (m.type != (type == WS_MSG_HELLO ? WS_MSG_HELLO : WS_MSG_ACK)) {
        rc = WS_ERR(WS_ERR_FORMAT, "%s: %s answered with an unexpected %s", what,
                    ws_chan_peer_label(s->chan), ws_remote_msg_name(m.type));
    } else if (type != WS_MSG_HELLO) {
        uint32_t acked = 0;
        if (m.len >= 4) memcpy(&acked, m.payload, 4);
        if (m.len != 16 || acked != type)
            rc = WS_ERR(WS_ERR_FORMAT, "%s: %s acknowledged %s, not %s", what,
                        ws_chan_peer_label(s->chan), ws_remote_msg_name(acked),
                        ws_remote_msg_name(type));
    }
    if (rc == WS_OK && reply) {
        *reply = m;
        return WS_OK;
    }
    ws_chan_msg_free(&m);
    return rc;
}

ws_status ws_sender_connect(const char *name, const ws_sender_opts *opts, ws_sender **out)
{
    *out = NULL;
    ws_sender *s = ws_calloc(1, sizeof *s);
    if (!s) return WS_ERR(WS_ERR_NOMEM, "sender: out of memory");
    if (opts) s->opts = *opts;
    if (s->opts.timeout_ms <= 0) s->opts.timeout_ms = DEFAULT_TIMEOUT_MS;
    if (s->opts.connect_timeout_ms <= 0) s->opts.connect_timeout_ms = DEFAULT_CONNECT_MS;
    if (!s->opts.slot_bytes) s->opts.slot_bytes = DEFAULT_SLOT_BYTES;
    snprintf(s->role, sizeof s->role, "%s", s->opts.role ? s->opts.role : "trainer");
    s->opts.role = s->role;
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) s->shm[i] = (ws_shm)WS_SHM_INIT;
    ws_status rc = ws_chan_connect(name, s->opts.connect_timeout_ms, s->opts.interrupted,
                                   s->opts.ctx, &s->chan);
    ws_wbuf w = {0};
    ws_chan_msg m = {0};
    if (rc == WS_OK) {
        ws_wbuf_u32(&w, WS_REMOTE_PROTOCOL);
        ws_wbuf_u32(&w, (uint32_t)getpid());
        ws_wbuf_str(&w, s->role);
        rc = w.oom ? WS_ERR(WS_ERR_NOMEM, "out of memory for the greeting")
                   : ws_chan_send(s->chan, WS_MSG_HELLO, w.data, w.len, NULL, 0,
                                  s->opts.timeout_ms, "the greeting");
    }
    if (rc == WS_OK) rc = wait_reply(s, WS_MSG_HELLO, "the greeting", &m, NULL);
    if (rc == WS_OK) {
        ws_rbuf rb = {m.payload, m.len, 0, 0};
        uint32_t proto = ws_rbuf_u32(&rb);
        (void)ws_rbuf_u32(&rb);
        const char *role = ws_rbuf_str(&rb);
        if (!rb.bad) ws_chan_set_peer_role(s->chan, role);
        if (rb.bad || proto != WS_REMOTE_PROTOCOL)
            rc = WS_ERR(WS_ERR_FORMAT, "sender: %s speaks protocol %u, this %s speaks %u; run "
                        "the same wshost on both sides", ws_chan_peer_label(s->chan), proto,
                        s->role, WS_REMOTE_PROTOCOL);
    }
    ws_chan_msg_free(&m);
    ws_wbuf_free(&w);
    if (rc == WS_OK) rc = recv_shared(s);
    if (rc != WS_OK) {
        ws_errprefix("sender: connecting to '%s'", name);
        ws_chan_close(s->chan);
        free_shared(s);
        free(s);
        return rc;
    }
    *out = s;
    return WS_OK;
}

/* Freeing CUDA IPC memory that another process still has open is undefined
 * behaviour (cudaIpcOpenMemHandle). So with GPU slots the sender says CLOSE
 * (also in the middle of a sync: the receiver then keeps that sync's
 * tensors invalid) and waits, up to CLOSE_WAIT_MS and deaf to interrupts,
 * for the receiver's ACK(CLOSE), which it sends once it has unmapped them.
 * Over a broken connection it ends its writing side and waits for the
 * receiver to drop the connection (which unmaps first). 1: the slots may be
 * freed (released, or the receiver's process is gone); 0: the receiver
 * still holds them, and they stay allocated rather than be freed under it. */
static int released_by_peer(ws_sender *s)
{
    if (!s->chan || !ws_chan_peer_alive(s->chan)) return 1;
    ws_err_saved e;
    ws_err_save(&e);
    ws_chan_set_interrupt(s->chan, NULL, NULL);
    int told = !s->broken && ws_chan_send(s->chan, WS_MSG_CLOSE, NULL, 0, NULL, 0, CLOSE_SEND_MS,
                                          "leaving") == WS_OK;
    if (!told) ws_chan_shutdown_write(s->chan);
    double until = ws_chan_now_ms() + CLOSE_WAIT_MS;
    int released = 0;
    ws_status rc = WS_OK;
    while (!released && rc == WS_OK) { /* other late replies are dropped */
        double left = until - ws_chan_now_ms();
        ws_chan_msg m;
        rc = left > 0 ? ws_chan_recv(s->chan, (int)left + 1, &m, "leaving") : WS_ERR_TIMEOUT;
        if (rc != WS_OK) break;
        uint32_t acked = 0;
        if (m.type == WS_MSG_ACK && m.len >= 4) memcpy(&acked, m.payload, 4);
        released = told && acked == WS_MSG_CLOSE;
        ws_chan_msg_free(&m);
    }
    /* The connection ended: the receiver dropped it, and unmapped first. */
    if (!released) released = rc == WS_ERR_COMM || !ws_chan_peer_alive(s->chan);
    ws_err_restore(&e);
    return released;
}

void ws_sender_close(ws_sender *s)
{
    if (!s) return;
    int keep_gpu_slots = 0;
    if (s->gpu_slots) {
        keep_gpu_slots = !released_by_peer(s);
    } else if (s->chan && !s->broken && !s->syncing) {
        /* Leaving in the middle of a sync is not a clean CLOSE: the receiver
         * sees the connection end and keeps that sync's tensors invalid. */
        ws_err_saved e;
        ws_err_save(&e);
        (void)ws_chan_send(s->chan, WS_MSG_CLOSE, NULL, 0, NULL, 0, CLOSE_SEND_MS, "leaving");
        ws_err_restore(&e);
    }
    ws_chan_close(s->chan);
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) {
        if (!keep_gpu_slots) ws_tensor_free(&s->slot[i]);
        ws_shm_free(&s->shm[i]);
    }
    free_sync(s);
    free_shared(s);
    free(s);
}

typedef struct ipc_slot {
    ws_device *dev;
    void *ptr;
    size_t bytes;
} ipc_slot;

static void free_ipc_slot(void *ctx)
{
    ipc_slot *sl = ctx;
    sl->dev->ops->ipc_free(sl->dev, sl->ptr, sl->bytes);
    free(sl);
}

/* Slots in GPU memory (opts.slot_device): cudaMalloc'ed, their CUDA IPC
 * handles sent in SLOTS instead of memfds. */
static ws_status create_gpu_slots(ws_sender *s, const char *what)
{
    ws_device *dev = s->opts.slot_device;
    if (!dev->ops->ipc_alloc)
        return WS_ERR(WS_ERR_ARG, "%s: %s cannot share memory with another process", what,
                      dev->name);
    unsigned char handles[WS_REMOTE_SLOTS][WS_IPC_HANDLE_BYTES];
    ws_status rc = WS_OK;
    for (int i = 0; rc == WS_OK && i < WS_REMOTE_SLOTS; i++) {
        ipc_slot *sl = ws_calloc(1, sizeof *sl);
        if (!sl) rc = WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
        if (rc == WS_OK) rc = dev->ops->ipc_alloc(dev, s->opts.slot_bytes, &sl->ptr, handles[i]);
        if (rc != WS_OK) {
            free(sl);
            break;
        }
        *sl = (ipc_slot){dev, sl->ptr, s->opts.slot_bytes};
        ws_external mem = {.data = sl->ptr, .nbytes = sl->bytes, .device = dev,
                           .release = free_ipc_slot, .release_ctx = sl};
        int64_t len = (int64_t)sl->bytes;
        char name[32];
        snprintf(name, sizeof name, "slot %d", i);
        rc = ws_tensor_external(&s->slot[i], &mem, WS_U8, 1, &len, name);
        if (rc != WS_OK) free_ipc_slot(sl);
    }
    ws_wbuf w = {0};
    if (rc == WS_OK) {
        ws_wbuf_u32(&w, WS_REMOTE_SLOTS);
        for (int i = 0; i < WS_REMOTE_SLOTS; i++) ws_wbuf_u64(&w, s->opts.slot_bytes);
        ws_wbuf_u8(&w, WS_SLOTS_GPU);
        for (int i = 0; i < WS_REMOTE_SLOTS; i++) ws_wbuf_put(&w, handles[i], WS_IPC_HANDLE_BYTES);
        rc = w.oom ? WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what)
                   : fail(s, ws_chan_send(s->chan, WS_MSG_SLOTS, w.data, w.len, NULL, 0,
                                          s->opts.timeout_ms, what));
    }
    ws_wbuf_free(&w);
    if (rc == WS_OK) rc = fail(s, wait_reply(s, WS_MSG_SLOTS, what, NULL, NULL));
    if (rc != WS_OK) {
        for (int i = 0; i < WS_REMOTE_SLOTS; i++) ws_tensor_free(&s->slot[i]);
        return rc;
    }
    s->slots_sent = 1;
    s->gpu_slots = 1;
    return WS_OK;
}

static ws_status create_slots(ws_sender *s, const char *what)
{
    if (s->opts.slot_device && s->opts.slot_device->kind != WS_DEVICE_CPU)
        return create_gpu_slots(s, what);
    ws_status rc = WS_OK;
    for (int i = 0; rc == WS_OK && i < WS_REMOTE_SLOTS; i++) {
        /* Pages are committed as buckets first reach them: slots sized for
         * bucket_mb cost only what the model's buckets use. */
        rc = ws_shm_create_lazy(&s->shm[i], s->opts.slot_bytes, what);
        if (rc == WS_OK) {
            ws_external mem = {.data = s->shm[i].data, .nbytes = s->shm[i].nbytes};
            int64_t len = (int64_t)s->shm[i].nbytes;
            char name[32];
            snprintf(name, sizeof name, "slot %d", i);
            rc = ws_tensor_external(&s->slot[i], &mem, WS_U8, 1, &len, name);
        }
    }
    ws_wbuf w = {0};
    int fds[WS_REMOTE_SLOTS];
    if (rc == WS_OK) {
        ws_wbuf_u32(&w, WS_REMOTE_SLOTS);
        for (int i = 0; i < WS_REMOTE_SLOTS; i++) {
            ws_wbuf_u64(&w, s->shm[i].nbytes);
            fds[i] = s->shm[i].fd;
        }
        ws_wbuf_u8(&w, WS_SLOTS_HOST);
        rc = w.oom ? WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what)
                   : fail(s, ws_chan_send(s->chan, WS_MSG_SLOTS, w.data, w.len, fds,
                                          WS_REMOTE_SLOTS, s->opts.timeout_ms, what));
    }
    ws_wbuf_free(&w);
    /* The receiver holds its own descriptors now; the mappings are enough here. */
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) ws_shm_close_fd(&s->shm[i]);
    if (rc == WS_OK) rc = fail(s, wait_reply(s, WS_MSG_SLOTS, what, NULL, NULL));
    if (rc != WS_OK) {
        for (int i = 0; i < WS_REMOTE_SLOTS; i++) {
            ws_tensor_free(&s->slot[i]);
            ws_shm_free(&s->shm[i]);
        }
        return rc;
    }
    s->slots_sent = 1;
    return WS_OK;
}

static ws_status copy_manifest(ws_sender *s, const ws_wire_tensor *ts, size_t n, ws_wbuf *w)
{
    s->names = ws_calloc(n ? n : 1, sizeof *s->names);
    s->dtypes = ws_calloc(n ? n : 1, sizeof *s->dtypes);
    s->numels = ws_calloc(n ? n : 1, sizeof *s->numels);
    s->sums = ws_calloc(n ? n : 1, sizeof *s->sums);
    if (!s->names || !s->dtypes || !s->numels || !s->sums)
        return WS_ERR(WS_ERR_NOMEM, "out of memory for a manifest of %zu tensors", n);
    s->n = n;
    for (size_t i = 0; i < n; i++) {
        const ws_wire_tensor *t = &ts[i];
        size_t len = t->name ? strlen(t->name) : 0;
        if (len == 0 || len > UINT16_MAX || (unsigned)t->dtype >= WS_DTYPE_COUNT ||
            t->ndim < 0 || t->ndim > WS_MAX_DIMS)
            return WS_ERR(WS_ERR_ARG, "manifest entry %zu ('%s'): needs a name of 1 to %d "
                          "characters, a known dtype and 0 to %d dimensions", i + 1,
                          t->name ? t->name : "(null)", UINT16_MAX, WS_MAX_DIMS);
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0 || (t->shape[d] && numel > UINT64_MAX / (uint64_t)t->shape[d]))
                return WS_ERR(WS_ERR_ARG, "manifest entry %zu ('%s'): bad shape", i + 1,
                              t->name);
            numel *= (uint64_t)t->shape[d];
        }
        if (!(s->names[i] = ws_strdup(t->name)))
            return WS_ERR(WS_ERR_NOMEM, "out of memory for a manifest of %zu tensors", n);
        s->dtypes[i] = t->dtype;
        s->numels[i] = numel;
        ws_wbuf_str(w, t->name);
        ws_wbuf_u8(w, (uint8_t)t->dtype);
        ws_wbuf_u8(w, (uint8_t)t->ndim);
        for (int d = 0; d < t->ndim; d++) ws_wbuf_u64(w, (uint64_t)t->shape[d]);
    }
    return w->oom ? WS_ERR(WS_ERR_NOMEM, "out of memory for a manifest of %zu tensors", n) : WS_OK;
}

ws_status ws_sender_begin(ws_sender *s, const ws_wire_tensor *tensors, size_t n,
                          uint64_t weight_version, unsigned flags)
{
    char what[96];
    snprintf(what, sizeof what, "sync of weight version %" PRIu64, weight_version);
    WS_TRY(check_usable(s, what));
    if (s->syncing)
        return WS_ERR(WS_ERR_ARG, "%s: the sync of weight version %" PRIu64 " is not finished",
                      what, s->version);
    if (n > UINT32_MAX) return WS_ERR(WS_ERR_ARG, "%s: %zu tensors is too many", what, n);
    ws_wbuf w = {0};
    ws_wbuf_u64(&w, weight_version);
    ws_wbuf_u32(&w, flags);
    ws_wbuf_u32(&w, (uint32_t)n);
    ws_status rc = copy_manifest(s, tensors, n, &w);
    if (rc != WS_OK) ws_errprefix("%s", what);
    if (rc == WS_OK)
        rc = fail(s, ws_chan_send(s->chan, WS_MSG_MANIFEST, w.data, w.len, NULL, 0,
                                  s->opts.timeout_ms, what));
    ws_wbuf_free(&w);
    /* A refusal is an ERROR reply on a healthy connection; anything else breaks it. */
    if (rc == WS_OK) {
        int refused;
        rc = wait_reply(s, WS_MSG_MANIFEST, what, NULL, &refused);
        if (rc != WS_OK && !refused) fail(s, rc);
    }
    /* The receiver accepted the manifest and waits for this sync: from here
     * any failure leaves the two sides out of step. */
    /* A direct sync writes the receiver's shared memory in place: no slots. */
    if (rc == WS_OK && !s->slots_sent && !(flags & WS_MANIFEST_DIRECT))
        rc = fail(s, create_slots(s, what));
    if (rc != WS_OK) {
        free_sync(s);
        return rc;
    }
    s->version = weight_version;
    s->syncing = 1;
    s->next_seq = s->next_ack_seq = 0;
    s->next_slot = 0; /* both slots were acknowledged by the last finish */
    return WS_OK;
}

/* Waits until `slot`'s bucket is acknowledged. Acknowledgements come in the
 * order the buckets were sent, whichever slot each went to. */
static ws_status await_slot(ws_sender *s, int slot, const char *what)
{
    double t0 = ws_chan_now_ms();
    ws_status rc = WS_OK;
    while (rc == WS_OK && s->busy[slot]) {
        char step[160];
        snprintf(step, sizeof step, "%s: waiting for the acknowledgement of bucket %" PRIu64,
                 what, s->next_ack_seq + 1);
        ws_chan_msg m;
        rc = wait_reply(s, WS_MSG_BUCKET, step, &m, NULL);
        if (rc != WS_OK) break;
        uint32_t acked_slot;
        uint64_t seq;
        memcpy(&acked_slot, m.payload + 4, 4);
        memcpy(&seq, m.payload + 8, 8);
        ws_chan_msg_free(&m);
        int k = -1;
        for (int i = 0; i < WS_REMOTE_SLOTS; i++)
            if (s->busy[i] && s->busy_seq[i] == s->next_ack_seq) k = i;
        if (seq != s->next_ack_seq || k < 0 || acked_slot != (uint32_t)k) {
            rc = WS_ERR(WS_ERR_FORMAT, "%s: %s acknowledged bucket %" PRIu64 " in slot %u, "
                        "expected bucket %" PRIu64 " in slot %d", step,
                        ws_chan_peer_label(s->chan), seq + 1, acked_slot, s->next_ack_seq + 1, k);
            break;
        }
        s->busy[k] = 0;
        s->next_ack_seq++;
    }
    s->stats.wait_ms += ws_chan_now_ms() - t0;
    return fail(s, rc);
}

static size_t align_up(size_t x)
{
    return (x + WS_REMOTE_ALIGN - 1) / WS_REMOTE_ALIGN * WS_REMOTE_ALIGN;
}

ws_status ws_sender_bucket(ws_sender *s, const ws_sender_piece *pieces, size_t n)
{
    char what[96];
    snprintf(what, sizeof what, "sync of weight version %" PRIu64 ": bucket %" PRIu64,
             s->version, s->next_seq + 1);
    WS_TRY(check_usable(s, what));
    if (!s->syncing) return WS_ERR(WS_ERR_ARG, "%s: no sync begun (ws_sender_begin)", what);
    if (n > UINT32_MAX / 2) return WS_ERR(WS_ERR_ARG, "%s: too many pieces", what);
    size_t *offsets = ws_calloc(n ? n : 1, sizeof *offsets);
    const ws_tensor **srcs = ws_calloc(n ? n : 1, sizeof *srcs);
    ws_wbuf w = {0};
    ws_status rc = WS_OK;
    if (!offsets || !srcs) rc = WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
    /* Check every piece and lay the slot out before touching it. */
    size_t at = 0;
    int all_on_host = 1;
    ws_wbuf_u64(&w, s->next_seq);
    ws_wbuf_u32(&w, (uint32_t)s->next_slot);
    ws_wbuf_u32(&w, (uint32_t)n);
    for (size_t i = 0; rc == WS_OK && i < n; i++) {
        const ws_sender_piece *p = &pieces[i];
        char ctx[160];
        snprintf(ctx, sizeof ctx, "%s: piece %zu", what, i + 1);
        if (p->tensor >= s->n) {
            rc = WS_ERR(WS_ERR_ARG, "%s names tensor #%u; the manifest has %zu", ctx, p->tensor,
                        s->n);
            break;
        }
        rc = p->src ? ws_tensor_check_readable(p->src, ctx)
                    : WS_ERR(WS_ERR_ARG, "%s has no source tensor", ctx);
        if (rc != WS_OK) break;
        uint64_t count = (uint64_t)ws_tensor_numel(p->src), numel = s->numels[p->tensor];
        char lb[200], ty[160];
        if (p->src->dtype != s->dtypes[p->tensor] || !ws_tensor_is_contiguous(p->src) ||
            p->elem_offset > numel || count > numel - p->elem_offset) {
            rc = WS_ERR(WS_ERR_ARG, "%s: %s %s does not fit '%s' (%s, %" PRIu64 " elements) at "
                        "element %" PRIu64 "; pieces are contiguous, of the manifest's dtype, "
                        "inside the tensor", ctx, ws_tensor_label(p->src, lb, sizeof lb),
                        ws_tensor_typestr(p->src, ty, sizeof ty), s->names[p->tensor],
                        ws_dtype_name(s->dtypes[p->tensor]), numel, p->elem_offset);
            break;
        }
        size_t bytes = ws_tensor_nbytes(p->src);
        if (bytes > s->opts.slot_bytes || at > s->opts.slot_bytes - bytes) {
            char have[32], need[32];
            rc = WS_ERR(WS_ERR_ARG, "%s: the pieces need more than a slot holds (%s); split "
                        "them over more buckets (a slot has %s)", ctx,
                        ws_format_bytes(need, sizeof need, at + bytes),
                        ws_format_bytes(have, sizeof have, s->opts.slot_bytes));
            break;
        }
        offsets[i] = at;
        srcs[i] = p->src;
        if (ws_tensor_device(p->src)->kind != WS_DEVICE_CPU) all_on_host = 0;
        ws_wbuf_u32(&w, p->tensor);
        ws_wbuf_u64(&w, p->elem_offset);
        ws_wbuf_u64(&w, count);
        ws_wbuf_u64(&w, at);
        at = align_up(at + bytes);
        if (at > s->opts.slot_bytes) at = s->opts.slot_bytes;
    }
    if (rc == WS_OK && w.oom) rc = WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
    /* Past this point a failure leaves the sync unfinishable (a slot or the
     * checksums half done, or the receiver out of step). */
    int checked = rc == WS_OK;
    int slot = s->next_slot;
    if (rc == WS_OK) rc = await_slot(s, slot, what);
    double t0 = ws_chan_now_ms();
    if (rc == WS_OK) {
        ws_tensor *sl = &s->slot[slot];
        ws_device *sdev = ws_tensor_device(sl);
        if (all_on_host && sdev->kind == WS_DEVICE_CPU) {
            rc = ws_pack(sl, srcs, n, offsets);
        } else {
            for (size_t i = 0; rc == WS_OK && i < n; i++) {
                ws_tensor dst = *sl;
                dst.dtype = srcs[i]->dtype;
                dst.offset = sl->offset + offsets[i];
                dst.layout = srcs[i]->layout;
                rc = ws_tensor_copy(&dst, srcs[i]);
            }
        }
        for (size_t i = 0; rc == WS_OK && i < n; i++) {
            uint64_t sum;
            rc = ws_tensor_checksum(srcs[i], pieces[i].elem_offset, srcs[i]->dtype, &sum);
            s->sums[pieces[i].tensor] += sum;
        }
        /* The engine process reads the slot as soon as it hears of it: copies
         * into GPU memory must be done, not merely queued. */
        if (rc == WS_OK && sdev->kind != WS_DEVICE_CPU) rc = ws_device_synchronize(sdev);
        if (rc != WS_OK) ws_errprefix("%s: packing", what);
    }
    s->stats.pack_ms += ws_chan_now_ms() - t0;
    if (rc == WS_OK) {
        rc = fail(s, ws_chan_send(s->chan, WS_MSG_BUCKET, w.data, w.len, NULL, 0,
                                  s->opts.timeout_ms, what));
    }
    if (rc == WS_OK) {
        s->busy[slot] = 1;
        s->busy_seq[slot] = s->next_seq++;
        s->next_slot = (slot + 1) % WS_REMOTE_SLOTS;
        s->stats.buckets++;
        for (size_t i = 0; i < n; i++) s->stats.bytes += ws_tensor_nbytes(srcs[i]);
    } else if (checked) {
        fail(s, rc);
    }
    ws_wbuf_free(&w);
    free(offsets);
    free(srcs);
    return rc;
}

ws_status ws_sender_slot(ws_sender *s, int slot, void **base, size_t *bytes)
{
    *base = NULL;
    *bytes = 0;
    char what[96];
    snprintf(what, sizeof what, "sync of weight version %" PRIu64 ": taking slot %d",
             s->version, slot);
    WS_TRY(check_usable(s, what));
    if (!s->slots_sent)
        return WS_ERR(WS_ERR_ARG, "%s: no slots yet; they are made by the first "
                      "ws_sender_begin", what);
    if (slot < 0 || slot >= WS_REMOTE_SLOTS)
        return WS_ERR(WS_ERR_ARG, "%s: the slots are 0 to %d", what, WS_REMOTE_SLOTS - 1);
    WS_TRY(await_slot(s, slot, what));
    slot_mem(s, slot, base, bytes);
    return WS_OK;
}

ws_status ws_sender_submit(ws_sender *s, int slot, const ws_wire_piece *pieces, size_t n)
{
    char what[128];
    snprintf(what, sizeof what, "sync of weight version %" PRIu64 ": bucket %" PRIu64
             " (slot %d)", s->version, s->next_seq + 1, slot);
    WS_TRY(check_usable(s, what));
    if (!s->syncing) return WS_ERR(WS_ERR_ARG, "%s: no sync begun (ws_sender_begin)", what);
    if (slot < 0 || slot >= WS_REMOTE_SLOTS)
        return WS_ERR(WS_ERR_ARG, "%s: the slots are 0 to %d", what, WS_REMOTE_SLOTS - 1);
    if (s->busy[slot])
        return WS_ERR(WS_ERR_ARG, "%s: the slot still holds bucket %" PRIu64 ", not yet "
                      "acknowledged; take it with ws_sender_slot before writing into it",
                      what, s->busy_seq[slot] + 1);
    if (n > UINT32_MAX / 2) return WS_ERR(WS_ERR_ARG, "%s: too many pieces", what);
    void *slot_base;
    size_t slot_bytes;
    slot_mem(s, slot, &slot_base, &slot_bytes);
    uint64_t bytes = 0;
    ws_wbuf w = {0};
    ws_wbuf_u64(&w, s->next_seq);
    ws_wbuf_u32(&w, (uint32_t)slot);
    ws_wbuf_u32(&w, (uint32_t)n);
    ws_status rc = WS_OK;
    for (size_t i = 0; i < n; i++) {
        const ws_wire_piece *p = &pieces[i];
        if (p->tensor >= s->n) {
            rc = WS_ERR(WS_ERR_ARG, "%s: piece %zu names tensor #%u; the manifest has %zu",
                        what, i + 1, p->tensor, s->n);
            break;
        }
        uint64_t numel = s->numels[p->tensor], esize = ws_dtype_size(s->dtypes[p->tensor]);
        if (p->elem_offset > numel || p->elem_count > numel - p->elem_offset) {
            rc = WS_ERR(WS_ERR_ARG, "%s: piece %zu, elements [%" PRIu64 ", +%" PRIu64 "), is "
                        "not inside '%s' (%" PRIu64 " elements)", what, i + 1, p->elem_offset,
                        p->elem_count, s->names[p->tensor], numel);
            break;
        }
        if (p->byte_offset % WS_REMOTE_ALIGN || p->byte_offset > slot_bytes ||
            p->elem_count > (slot_bytes - p->byte_offset) / esize) {
            rc = WS_ERR(WS_ERR_ARG, "%s: piece %zu ('%s', %" PRIu64 " elements of %" PRIu64
                        " bytes) at byte %" PRIu64 " does not fit a slot of %zu bytes at a "
                        "multiple of %d", what, i + 1, s->names[p->tensor], p->elem_count,
                        esize, p->byte_offset, slot_bytes, WS_REMOTE_ALIGN);
            break;
        }
        bytes += p->elem_count * esize;
        ws_wbuf_u32(&w, p->tensor);
        ws_wbuf_u64(&w, p->elem_offset);
        ws_wbuf_u64(&w, p->elem_count);
        ws_wbuf_u64(&w, p->byte_offset);
    }
    if (rc == WS_OK && w.oom) rc = WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
    if (rc == WS_OK)
        rc = fail(s, ws_chan_send(s->chan, WS_MSG_BUCKET, w.data, w.len, NULL, 0,
                                  s->opts.timeout_ms, what));
    ws_wbuf_free(&w);
    if (rc != WS_OK) return rc;
    s->busy[slot] = 1;
    s->busy_seq[slot] = s->next_seq++;
    s->next_slot = (slot + 1) % WS_REMOTE_SLOTS;
    s->submitted = 1;
    s->stats.buckets++;
    s->stats.bytes += bytes;
    return WS_OK;
}

/* Names and labels must fit the wire's strings. */
static ws_status check_proofs(const ws_proof *proofs, size_t n, const char *what)
{
    if (n > UINT32_MAX) return WS_ERR(WS_ERR_ARG, "%s: %zu proofs is too many", what, n);
    for (size_t i = 0; i < n; i++) {
        const ws_proof *p = &proofs[i];
        size_t len = p->tensor ? strlen(p->tensor) : 0;
        if (len == 0 || len > UINT16_MAX || (p->label && strlen(p->label) > UINT16_MAX))
            return WS_ERR(WS_ERR_ARG, "%s: proof %zu needs a tensor name of 1 to %d "
                          "characters (and a label of at most that)", what, i + 1, UINT16_MAX);
    }
    return WS_OK;
}

static ws_status finish(ws_sender *s, const ws_proof *proofs, size_t n, const char *what)
{
    ws_status rc = WS_OK;
    for (int i = 0; rc == WS_OK && i < WS_REMOTE_SLOTS; i++)
        rc = await_slot(s, (s->next_slot + i) % WS_REMOTE_SLOTS, what);
    ws_wbuf w = {0};
    ws_wbuf_u64(&w, s->version);
    ws_wbuf_proofs(&w, proofs, n);
    if (rc == WS_OK && w.oom) rc = fail(s, WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what));
    if (rc == WS_OK)
        rc = fail(s, ws_chan_send(s->chan, WS_MSG_FINISH, w.data, w.len, NULL, 0,
                                  s->opts.timeout_ms, what));
    ws_wbuf_free(&w);
    if (rc == WS_OK) {
        /* A refusal ends the sync on both sides; the connection lives on. */
        int refused;
        rc = wait_reply(s, WS_MSG_FINISH, what, NULL, &refused);
        if (rc != WS_OK && !refused) return fail(s, rc);
        free_sync(s);
    }
    return rc;
}

ws_status ws_sender_finish(ws_sender *s)
{
    char what[96];
    snprintf(what, sizeof what, "sync of weight version %" PRIu64 ": finish", s->version);
    WS_TRY(check_usable(s, what));
    if (!s->syncing) return WS_ERR(WS_ERR_ARG, "%s: no sync begun (ws_sender_begin)", what);
    if (s->submitted)
        return WS_ERR(WS_ERR_ARG, "%s: buckets submitted with ws_sender_submit carry no "
                      "checksums here; finish with ws_sender_finish_proven", what);
    ws_proof *proofs = ws_calloc(s->n ? s->n : 1, sizeof *proofs);
    if (!proofs) return fail(s, WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what));
    for (size_t i = 0; i < s->n; i++)
        proofs[i] = (ws_proof){s->names[i], NULL, 0, s->numels[i], s->sums[i]};
    ws_status rc = finish(s, proofs, s->n, what);
    free(proofs);
    return rc;
}

ws_status ws_sender_finish_proven(ws_sender *s, const ws_proof *proofs, size_t n)
{
    char what[96];
    snprintf(what, sizeof what, "sync of weight version %" PRIu64 ": finish", s->version);
    WS_TRY(check_usable(s, what));
    if (!s->syncing) return WS_ERR(WS_ERR_ARG, "%s: no sync begun (ws_sender_begin)", what);
    WS_TRY(check_proofs(proofs, n, what));
    return finish(s, proofs, n, what);
}

static ws_status request(ws_sender *s, uint32_t type, const ws_wbuf *w, const char *what)
{
    WS_TRY(check_usable(s, what));
    if (s->syncing)
        return WS_ERR(WS_ERR_ARG, "%s: the sync of weight version %" PRIu64 " is not finished",
                      what, s->version);
    if (w->oom) return WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
    WS_TRY(fail(s, ws_chan_send(s->chan, type, w->data, w->len, NULL, 0, s->opts.timeout_ms,
                                what)));
    int refused;
    ws_status rc = wait_reply(s, type, what, NULL, &refused);
    /* The receiver's callback failing leaves the connection as it was. */
    if (rc != WS_OK && !refused) fail(s, rc);
    return rc;
}

ws_status ws_sender_wake(ws_sender *s, const char *tag)
{
    char what[96];
    snprintf(what, sizeof what, "wake(%s)", tag ? tag : "");
    if (!tag || !*tag || strlen(tag) > 255)
        return WS_ERR(WS_ERR_ARG, "%s: a tag of 1 to 255 characters", what);
    ws_wbuf w = {0};
    ws_wbuf_str(&w, tag);
    ws_status rc = request(s, WS_MSG_WAKE, &w, what);
    ws_wbuf_free(&w);
    return rc;
}

ws_status ws_sender_sleep(ws_sender *s, int level)
{
    char what[64];
    snprintf(what, sizeof what, "sleep(level=%d)", level);
    ws_wbuf w = {0};
    ws_wbuf_u32(&w, (uint32_t)level);
    ws_status rc = request(s, WS_MSG_SLEEP, &w, what);
    ws_wbuf_free(&w);
    return rc;
}

ws_status ws_sender_verify(ws_sender *s, const ws_proof *proofs, size_t n, unsigned flags)
{
    char what[96];
    snprintf(what, sizeof what, "verify(%zu %s)", n,
             flags & WS_VERIFY_VALIDITY ? "tensors valid" : "checksums");
    WS_TRY(check_proofs(proofs, n, what));
    ws_wbuf w = {0};
    ws_wbuf_u32(&w, flags);
    ws_wbuf_proofs(&w, proofs, n);
    ws_status rc = request(s, WS_MSG_VERIFY, &w, what);
    ws_wbuf_free(&w);
    return rc;
}
