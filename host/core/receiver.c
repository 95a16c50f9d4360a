/* receiver.c: the engine side of remote.h.
 *
 * The receiver owns the channel and the mapped slots, and writes into the
 * parameters registered with it. It trusts nothing the sender says: every
 * index, offset and length of a bucket is checked against the manifest and
 * the slot before a byte is copied, and the manifest against the receiver's
 * own parameters before a sync begins. The tensors a sync names are invalid
 * from its manifest until its checksums are verified.
 *
 * Verifying costs no second pass over the weights: each piece is checksummed
 * right after it is copied, chunk by chunk while the bytes are still in the
 * cache, into a per-tensor landed sum, and FINISH compares those sums with
 * the sums of the sender's proofs. Only a mismatch reads tensors again, to
 * name the range that differs. */
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "chan.h"
#include "fault.h"
#include "parallel.h"
#include "remote.h"
#include "remote_wire.h"
#include "shm.h"
#include "strmap.h"

#define DEFAULT_TIMEOUT_MS 30000
#define ERROR_SEND_MS 1000 /* telling a sender why is best effort */
/* Bytes copied, then checksummed, at a time on the host: small enough that
 * the checksum reads them back from the cache. */
#define LAND_CHUNK_BYTES ((size_t)512 << 10)
#define WHY_BYTES 320

/* Arena chunks are at least this large (a few for a whole model). */
#define CHUNK_MIN_BYTES ((size_t)256 << 20)
#define SHARED_ALIGN 256

/* Elements [off, off + count) of manifest entry `entry`. */
typedef struct recv_range {
    size_t entry;
    uint64_t off, count;
} recv_range;

static int range_cmp(const void *a, const void *b)
{
    const recv_range *x = a, *y = b;
    if (x->entry != y->entry) return x->entry < y->entry ? -1 : 1;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Sorts the ranges; returns the first one that overlaps the range before
 * it (same entry), or NULL when none does. */
static const recv_range *first_overlap(recv_range *rs, size_t n)
{
    if (n > 1) qsort(rs, n, sizeof *rs, range_cmp);
    for (size_t i = 1; i < n; i++)
        if (rs[i].entry == rs[i - 1].entry && rs[i - 1].off + rs[i - 1].count > rs[i].off)
            return &rs[i];
    return NULL;
}

typedef struct recv_param {
    char *name;
    ws_tensor t; /* a view that keeps the destination alive */
    int valid;
    char why[WHY_BYTES]; /* why not valid */
    int shared;          /* made by ws_receiver_alloc: in chunk `chunk` at `offset` */
    uint32_t chunk;
    uint64_t offset;
} recv_param;

/* Memory shared with senders: a memfd (kept to announce to each sender) and
 * its mapping, as a u8 tensor whose views keep it mapped. */
typedef struct recv_chunk {
    int fd;
    size_t nbytes, used;
    ws_tensor mem;
} recv_chunk;

struct ws_receiver {
    ws_receiver_opts opts;
    char role[32];
    ws_chan_listener *listener;
    ws_chan *chan;
    recv_param *params;
    size_t n_params, cap_params;
    ws_strmap index; /* name -> params index */
    size_t index_keys;
    int ever_synced;
    /* The sync under way: its manifest (names point into the payload). */
    int syncing;
    uint64_t version, valid_version;
    ws_chan_msg manifest;
    size_t n_sync;
    uint32_t sync_flags;
    size_t *sync_param;
    uint64_t *sync_received; /* elements written per manifest entry */
    uint64_t *sync_landed;   /* checksum of the elements written, per manifest entry */
    /* Every non-empty piece that landed, so FINISH can check that no element
     * came twice: counts alone add up when one range lands twice and
     * another never does. */
    struct recv_range *sync_ranges;
    size_t n_ranges, cap_ranges;
    /* The sender's slots, mapped read-only. */
    ws_shm shm[WS_REMOTE_SLOTS];
    ws_tensor slot[WS_REMOTE_SLOTS];
    int n_slots;
    uint64_t next_seq;
    int refused; /* the last error was told to the sender; the connection lives on */
    ws_device *slot_dev; /* the GPU the sender's slots are mapped on; NULL: host memfds */
    recv_chunk *chunks; /* ws_receiver_alloc's arena */
    size_t n_chunks, cap_chunks;
    /* What another thread may read while this one serves: every tensor's
     * valid and why, syncing, ever_synced and valid_version. The serving
     * thread changes them under it; the state queries read under it. */
    pthread_mutex_t lock;
};

static void lock(const ws_receiver *r) { pthread_mutex_lock((pthread_mutex_t *)&r->lock); }
static void unlock(const ws_receiver *r) { pthread_mutex_unlock((pthread_mutex_t *)&r->lock); }

const char *ws_weights_state_name(ws_weights_state s)
{
    switch (s) {
    case WS_WEIGHTS_NONE: return "none";
    case WS_WEIGHTS_SYNCING: return "syncing";
    case WS_WEIGHTS_VALID: return "valid";
    case WS_WEIGHTS_INVALID: return "invalid";
    }
    return "?";
}

const char *ws_remote_msg_name(uint32_t type)
{
    static const char *const names[] = {"?",      "HELLO", "MANIFEST", "SLOTS", "BUCKET", "ACK",
                                        "FINISH", "WAKE",  "SLEEP",    "ERROR", "CLOSE",
                                        "VERIFY", "SHARED"};
    return type < sizeof names / sizeof *names ? names[type] : "?";
}

/* ---- registration ----------------------------------------------------------------- */

ws_status ws_receiver_create(const char *name, const ws_receiver_opts *opts, ws_receiver **out)
{
    *out = NULL;
    ws_receiver *r = ws_calloc(1, sizeof *r);
    if (!r) return WS_ERR(WS_ERR_NOMEM, "receiver: out of memory");
    if (opts) r->opts = *opts;
    pthread_mutex_init(&r->lock, NULL);
    if (r->opts.timeout_ms <= 0) r->opts.timeout_ms = DEFAULT_TIMEOUT_MS;
    snprintf(r->role, sizeof r->role, "%s", r->opts.role ? r->opts.role : "engine");
    r->opts.role = r->role;
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) r->shm[i] = (ws_shm)WS_SHM_INIT;
    ws_status rc = ws_chan_listen(name, &r->listener);
    if (rc != WS_OK) {
        pthread_mutex_destroy(&r->lock);
        free(r);
        ws_errprefix("receiver");
        return rc;
    }
    ws_chan_listener_set_interrupt(r->listener, r->opts.interrupted, r->opts.ctx);
    *out = r;
    return WS_OK;
}

static void unmap_slots(ws_receiver *r)
{
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) {
        ws_tensor_free(&r->slot[i]);
        ws_shm_free(&r->shm[i]);
    }
    r->n_slots = 0;
    r->slot_dev = NULL;
}

/* Marks a tensor invalid, saying why. */
static void invalidate(ws_receiver *r, recv_param *p, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void invalidate(ws_receiver *r, recv_param *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    lock(r);
    p->valid = 0;
    vsnprintf(p->why, sizeof p->why, fmt, ap);
    unlock(r);
    va_end(ap);
}

/* Ends the sync under way; `ok` marks its tensors valid, else they stay invalid. */
static void end_sync(ws_receiver *r, int ok)
{
    lock(r);
    if (r->syncing && ok) {
        for (size_t i = 0; i < r->n_sync; i++) r->params[r->sync_param[i]].valid = 1;
        r->valid_version = r->version;
    }
    r->syncing = 0;
    unlock(r);
    r->n_sync = 0;
    r->next_seq = 0;
    ws_chan_msg_free(&r->manifest);
    free(r->sync_param);
    free(r->sync_received);
    free(r->sync_landed);
    r->sync_param = NULL;
    r->sync_received = NULL;
    r->sync_landed = NULL;
    free(r->sync_ranges);
    r->sync_ranges = NULL;
    r->n_ranges = r->cap_ranges = 0;
}

/* Ends the sync under way with its tensors invalid, saying why (`why` is
 * the error that ended it). */
static void fail_sync(ws_receiver *r, const char *why)
{
    for (size_t i = 0; r->syncing && i < r->n_sync; i++) {
        invalidate(r, &r->params[r->sync_param[i]], "the sync of weight version %" PRIu64
                   " failed: %s", r->version, why);
    }
    end_sync(r, 0);
}

static void drop_connection(ws_receiver *r)
{
    end_sync(r, 0);
    unmap_slots(r);
    ws_chan_close(r->chan);
    r->chan = NULL;
}

void ws_receiver_free(ws_receiver *r)
{
    if (!r) return;
    drop_connection(r);
    ws_chan_listener_close(r->listener);
    for (size_t i = 0; i < r->n_chunks; i++) {
        if (r->chunks[i].fd >= 0) close(r->chunks[i].fd);
        ws_tensor_free(&r->chunks[i].mem);
    }
    free(r->chunks);
    for (size_t i = 0; i < r->n_params; i++) {
        free(r->params[i].name);
        ws_tensor_free(&r->params[i].t);
    }
    free(r->params);
    ws_strmap_free(&r->index);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

static ws_status rebuild_index(ws_receiver *r, size_t keys)
{
    ws_strmap m;
    WS_TRY(ws_strmap_init(&m, keys));
    for (size_t i = 0; i < r->n_params; i++) ws_strmap_put(&m, r->params[i].name, i, NULL);
    ws_strmap_free(&r->index);
    r->index = m;
    r->index_keys = keys;
    return WS_OK;
}

ws_status ws_receiver_add(ws_receiver *r, const char *name, const ws_tensor *t)
{
    if (!name || !*name) return WS_ERR(WS_ERR_ARG, "receiver: a tensor needs a name");
    char what[300];
    snprintf(what, sizeof what, "receiver: registering '%s'", name);
    WS_TRY(ws_tensor_check_writable(t, what));
    if (!ws_tensor_is_contiguous(t))
        return WS_ERR(WS_ERR_ARG, "%s: the tensor is not contiguous; pieces are written as "
                      "element ranges of a contiguous tensor", what);
    if (r->syncing)
        return WS_ERR(WS_ERR_ARG, "%s: a sync is under way", what);
    size_t found;
    if (r->n_params && ws_strmap_get(&r->index, name, &found))
        return WS_ERR(WS_ERR_ARG, "%s: the name is registered already", what);
    if (r->n_params + 1 > r->index_keys)
        WS_TRY(rebuild_index(r, r->index_keys ? 2 * r->index_keys : 64));
    if (r->n_params == r->cap_params) {
        size_t cap = r->cap_params ? 2 * r->cap_params : 16;
        recv_param *p = ws_realloc(r->params, cap * sizeof *p);
        if (!p) return WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
        r->params = p;
        r->cap_params = cap;
    }
    recv_param *p = &r->params[r->n_params];
    memset(p, 0, sizeof *p);
    invalidate(r, p, "not written by any sync yet");
    ws_status rc = ws_tensor_reshape(&p->t, t, t->layout.ndim, t->layout.shape);
    if (rc == WS_OK) rc = ws_tensor_set_name(&p->t, name);
    if (rc == WS_OK && !(p->name = ws_strdup(name)))
        rc = WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
    if (rc != WS_OK) {
        ws_tensor_free(&p->t);
        return rc;
    }
    ws_strmap_put(&r->index, p->name, r->n_params, NULL);
    r->n_params++;
    return WS_OK;
}

/* A new arena chunk of at least `need` bytes. */
static ws_status new_chunk(ws_receiver *r, size_t need, const char *what)
{
    if (r->n_chunks == r->cap_chunks) {
        size_t cap = r->cap_chunks ? 2 * r->cap_chunks : 4;
        recv_chunk *c = ws_realloc(r->chunks, cap * sizeof *c);
        if (!c) return WS_ERR(WS_ERR_NOMEM, "%s: out of memory", what);
        r->chunks = c;
        r->cap_chunks = cap;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t bytes = need > CHUNK_MIN_BYTES ? need : CHUNK_MIN_BYTES;
    bytes = (bytes + page - 1) / page * page;
    ws_shm shm;
    WS_TRY(ws_shm_create_lazy(&shm, bytes, what));
    recv_chunk *c = &r->chunks[r->n_chunks];
    memset(c, 0, sizeof *c);
    c->nbytes = shm.nbytes;
    ws_status rc = ws_shm_to_tensor(&shm, "memory shared with the trainer", "shared weights",
                                    &c->mem);
    if (rc != WS_OK) {
        ws_shm_free(&shm);
        return rc;
    }
    c->fd = shm.fd; /* the mapping is the tensor's now */
    r->n_chunks++;
    return WS_OK;
}

ws_status ws_receiver_alloc(ws_receiver *r, const char *name, ws_dtype dtype, int ndim,
                            const int64_t *shape, ws_tensor *out)
{
    memset(out, 0, sizeof *out);
    char what[300];
    snprintf(what, sizeof what, "receiver: allocating '%s'", name ? name : "?");
    if (!name || !*name) return WS_ERR(WS_ERR_ARG, "receiver: a tensor needs a name");
    if ((unsigned)dtype >= WS_DTYPE_COUNT || ndim < 0 || ndim > WS_MAX_DIMS)
        return WS_ERR(WS_ERR_ARG, "%s: bad dtype or number of dimensions", what);
    if (r->chan)
        return WS_ERR(WS_ERR_ARG, "%s: a trainer is connected; allocate before serving (the "
                      "shared memory is announced when a trainer connects)", what);
    size_t found;
    if (r->n_params && ws_strmap_get(&r->index, name, &found))
        return WS_ERR(WS_ERR_ARG, "%s: the name is registered already", what);
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0 || (shape[d] && numel > INT64_MAX / 16 / shape[d]))
            return WS_ERR(WS_ERR_ARG, "%s: bad shape", what);
        numel *= shape[d];
    }
    size_t bytes = (size_t)numel * ws_dtype_size(dtype);
    recv_chunk *c = r->n_chunks ? &r->chunks[r->n_chunks - 1] : NULL;
    size_t off = c ? (c->used + SHARED_ALIGN - 1) / SHARED_ALIGN * SHARED_ALIGN : 0;
    if (!c || off + bytes > c->nbytes) {
        WS_TRY(new_chunk(r, bytes ? bytes : 1, what));
        c = &r->chunks[r->n_chunks - 1];
        off = 0;
    }
    ws_tensor bytes_view = {0}, typed = {0};
    ws_status rc = ws_tensor_narrow(&bytes_view, &c->mem, 0, (int64_t)off, (int64_t)bytes);
    if (rc == WS_OK) rc = ws_tensor_view_dtype(&typed, &bytes_view, dtype);
    if (rc == WS_OK) rc = ws_tensor_reshape(out, &typed, ndim, shape);
    if (rc == WS_OK) rc = ws_tensor_set_name(out, name);
    if (rc == WS_OK) rc = ws_tensor_fill(out, 0);
    if (rc == WS_OK) rc = ws_receiver_add(r, name, out);
    ws_tensor_free(&bytes_view);
    ws_tensor_free(&typed);
    if (rc != WS_OK) {
        ws_tensor_free(out);
        return rc;
    }
    recv_param *p = &r->params[r->n_params - 1];
    p->shared = 1;
    p->chunk = (uint32_t)(r->n_chunks - 1);
    p->offset = off;
    c->used = off + bytes;
    return WS_OK;
}

/* SHARED, after the greeting: the arena's chunks (at most WS_CHAN_MAX_FDS
 * per message) and where each shared tensor is. */
static ws_status send_shared(ws_receiver *r)
{
    size_t per = WS_CHAN_MAX_FDS;
    size_t msgs = r->n_chunks ? (r->n_chunks + per - 1) / per : 1;
    ws_status rc = WS_OK;
    for (size_t k = 0; rc == WS_OK && k < msgs; k++) {
        size_t first = k * per, n = r->n_chunks - first < per ? r->n_chunks - first : per;
        if (!r->n_chunks) n = 0;
        int fds[WS_CHAN_MAX_FDS];
        ws_wbuf w = {0};
        ws_wbuf_u32(&w, (uint32_t)first);
        ws_wbuf_u32(&w, (uint32_t)n);
        for (size_t i = 0; i < n; i++) {
            ws_wbuf_u64(&w, r->chunks[first + i].nbytes);
            fds[i] = r->chunks[first + i].fd;
        }
        int last = k + 1 == msgs;
        ws_wbuf_u8(&w, (uint8_t)last);
        if (last) {
            uint32_t m = 0;
            for (size_t i = 0; i < r->n_params; i++) m += r->params[i].shared != 0;
            ws_wbuf_u32(&w, m);
            for (size_t i = 0; i < r->n_params; i++) {
                const recv_param *p = &r->params[i];
                if (!p->shared) continue;
                ws_wbuf_str(&w, p->name);
                ws_wbuf_u32(&w, p->chunk);
                ws_wbuf_u64(&w, p->offset);
                ws_wbuf_u64(&w, ws_tensor_nbytes(&p->t));
            }
        }
        rc = w.oom ? WS_ERR(WS_ERR_NOMEM, "receiver: out of memory")
                   : ws_chan_send(r->chan, WS_MSG_SHARED, w.data, w.len, fds, (int)n,
                                  r->opts.timeout_ms, "announcing the shared memory");
        ws_wbuf_free(&w);
    }
    return rc;
}

ws_weights_state ws_receiver_state(const ws_receiver *r, uint64_t *weight_version)
{
    ws_weights_state st = WS_WEIGHTS_VALID;
    lock(r);
    if (weight_version) *weight_version = r->valid_version;
    if (r->syncing) st = WS_WEIGHTS_SYNCING;
    else if (!r->ever_synced) st = WS_WEIGHTS_NONE;
    for (size_t i = 0; st == WS_WEIGHTS_VALID && i < r->n_params; i++)
        if (!r->params[i].valid) st = WS_WEIGHTS_INVALID;
    unlock(r);
    return st;
}

int ws_receiver_tensor_valid(const ws_receiver *r, const char *name)
{
    return ws_receiver_tensor_state(r, name, NULL, 0);
}

int ws_receiver_tensor_state(const ws_receiver *r, const char *name, char *why, size_t why_len)
{
    size_t i;
    if (why && why_len) why[0] = 0;
    if (!name || !r->n_params || !ws_strmap_get(&r->index, name, &i)) return -1;
    lock(r);
    int valid = r->params[i].valid;
    if (!valid && why && why_len) snprintf(why, why_len, "%s", r->params[i].why);
    unlock(r);
    return valid;
}

size_t ws_receiver_count(const ws_receiver *r) { return r->n_params; }

const char *ws_receiver_name(const ws_receiver *r, size_t i)
{
    return i < r->n_params ? r->params[i].name : NULL;
}

pid_t ws_receiver_peer_pid(const ws_receiver *r) { return r->chan ? ws_chan_peer_pid(r->chan) : 0; }

/* ---- replies ---------------------------------------------------------------------- */

static ws_status ack_within(ws_receiver *r, uint32_t type, uint32_t slot, uint64_t seq,
                            int timeout_ms, const char *what)
{
    unsigned char buf[16];
    memcpy(buf, &type, 4);
    memcpy(buf + 4, &slot, 4);
    memcpy(buf + 8, &seq, 8);
    return ws_chan_send(r->chan, WS_MSG_ACK, buf, sizeof buf, NULL, 0, timeout_ms, what);
}

static ws_status send_ack(ws_receiver *r, uint32_t type, uint32_t slot, uint64_t seq,
                          const char *what)
{
    return ack_within(r, type, slot, seq, r->opts.timeout_ms, what);
}

/* Tells the sender why (best effort: it may be the one that died), keeping
 * this thread's error as it was. */
static void send_error(ws_receiver *r)
{
    if (!r->chan || !ws_chan_peer_alive(r->chan)) return;
    ws_err_saved e;
    ws_err_save(&e);
    (void)ws_chan_send(r->chan, WS_MSG_ERROR, e.msg, strlen(e.msg), NULL, 0, ERROR_SEND_MS,
                       "reporting an error");
    ws_err_restore(&e);
}

/* ---- messages --------------------------------------------------------------------- */

static ws_status on_hello(ws_receiver *r, const ws_chan_msg *m)
{
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    uint32_t proto = ws_rbuf_u32(&rb);
    (void)ws_rbuf_u32(&rb); /* pid: SO_PEERCRED already told */
    const char *role = ws_rbuf_str(&rb);
    if (rb.bad)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed HELLO",
                      ws_chan_peer_label(r->chan));
    ws_chan_set_peer_role(r->chan, role);
    if (proto != WS_REMOTE_PROTOCOL)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s speaks protocol %u, this %s speaks %u; run "
                      "the same wshost on both sides", ws_chan_peer_label(r->chan), proto,
                      r->role, WS_REMOTE_PROTOCOL);
    ws_wbuf w = {0};
    ws_wbuf_u32(&w, WS_REMOTE_PROTOCOL);
    ws_wbuf_u32(&w, (uint32_t)getpid());
    ws_wbuf_str(&w, r->role);
    ws_status rc = w.oom ? WS_ERR(WS_ERR_NOMEM, "receiver: out of memory")
                         : ws_chan_send(r->chan, WS_MSG_HELLO, w.data, w.len, NULL, 0,
                                        r->opts.timeout_ms, "the greeting");
    ws_wbuf_free(&w);
    if (rc == WS_OK) rc = send_shared(r);
    return rc;
}

static ws_status check_entry(ws_receiver *r, size_t i, const char *name, uint8_t dtype,
                             uint8_t ndim, const int64_t *shape, size_t *param)
{
    if (!ws_strmap_get(&r->index, name, param))
        return WS_ERR(WS_ERR_ARG, "manifest: tensor '%s' (entry %zu) is not a parameter of "
                      "this %s", name, i + 1, r->role);
    const ws_tensor *t = &r->params[*param].t;
    int same = dtype == t->dtype && ndim == t->layout.ndim;
    for (int d = 0; same && d < ndim; d++) same = shape[d] == t->layout.shape[d];
    if (same) return WS_OK;
    char want[160], got[160];
    ws_tensor tmp = {.dtype = dtype < WS_DTYPE_COUNT ? (ws_dtype)dtype : WS_U8};
    ws_layout_contiguous(&tmp.layout, ndim, shape);
    if (dtype >= WS_DTYPE_COUNT) snprintf(got, sizeof got, "dtype #%u", dtype);
    else ws_tensor_typestr(&tmp, got, sizeof got);
    return WS_ERR(WS_ERR_ARG, "manifest: tensor '%s' is %s on the sender but %s in this %s",
                  name, got, ws_tensor_typestr(t, want, sizeof want), r->role);
}

/* Decodes and checks a manifest; on success the sync begins. */
static ws_status on_manifest(ws_receiver *r, ws_chan_msg *m, ws_receiver_event *ev)
{
    if (r->syncing)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a MANIFEST inside a sync",
                      ws_chan_peer_label(r->chan));
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    uint64_t version = ws_rbuf_u64(&rb);
    uint32_t flags = ws_rbuf_u32(&rb);
    uint32_t n = ws_rbuf_u32(&rb);
    if (rb.bad || n > m->len)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed MANIFEST",
                      ws_chan_peer_label(r->chan));
    size_t *param = ws_calloc(n ? n : 1, sizeof *param);
    uint64_t *received = ws_calloc(n ? n : 1, sizeof *received);
    uint64_t *landed = ws_calloc(n ? n : 1, sizeof *landed);
    unsigned char *seen = ws_calloc(r->n_params ? r->n_params : 1, 1);
    ws_status rc = WS_OK;
    if (!param || !received || !landed || !seen)
        rc = WS_ERR(WS_ERR_NOMEM, "receiver: out of memory for a manifest of %u tensors", n);
    if (rc == WS_OK && r->n_params == 0 && n > 0)
        rc = WS_ERR(WS_ERR_ARG, "manifest: this %s has no parameters registered", r->role);
    for (uint32_t i = 0; rc == WS_OK && i < n; i++) {
        const char *name = ws_rbuf_str(&rb);
        uint8_t dtype = ws_rbuf_u8(&rb), ndim = ws_rbuf_u8(&rb);
        int64_t shape[WS_MAX_DIMS];
        if (ndim > WS_MAX_DIMS) rb.bad = 1;
        for (int d = 0; !rb.bad && d < ndim; d++) shape[d] = (int64_t)ws_rbuf_u64(&rb);
        if (rb.bad) {
            rc = WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed MANIFEST (entry %u)",
                        ws_chan_peer_label(r->chan), i + 1);
            break;
        }
        rc = check_entry(r, i, name, dtype, ndim, shape, &param[i]);
        if (rc == WS_OK && (flags & WS_MANIFEST_DIRECT) && !r->params[param[i]].shared)
            rc = WS_ERR(WS_ERR_ARG, "manifest: tensor '%s' is this %s's own memory, not memory "
                        "it shares (ws_receiver_alloc); a direct sync writes only shared "
                        "tensors", name, r->role);
        if (rc == WS_OK && seen[param[i]])
            rc = WS_ERR(WS_ERR_ARG, "manifest: tensor '%s' appears twice", name);
        if (rc == WS_OK) seen[param[i]] = 1;
    }
    if (rc == WS_OK && !(flags & WS_MANIFEST_PARTIAL)) {
        for (size_t p = 0; p < r->n_params; p++) {
            if (seen[p]) continue;
            rc = WS_ERR(WS_ERR_ARG, "manifest: this %s's tensor '%s' is not in it (a full sync "
                        "names every tensor: the sender names %u, this %s holds %zu)", r->role,
                        r->params[p].name, n, r->role, r->n_params);
            break;
        }
    }
    free(seen);
    if (rc != WS_OK) {
        /* Nothing changed here: the sender hears why and may try again. */
        r->refused = rc != WS_ERR_FORMAT; /* a malformed one ends the connection */
        free(param);
        free(received);
        free(landed);
        ws_errprefix("sync of weight version %" PRIu64 " refused before any byte moved",
                     version);
        return rc;
    }
    /* From here the named tensors are not to be trusted until FINISH. */
    for (uint32_t i = 0; i < n; i++) {
        invalidate(r, &r->params[param[i]], "the sync of weight version %" PRIu64
                   " is under way", version);
    }
    r->manifest = *m;
    *m = (ws_chan_msg){0};
    r->sync_param = param;
    r->sync_received = received;
    r->sync_landed = landed;
    r->sync_flags = flags;
    r->n_sync = n;
    r->version = version;
    lock(r);
    r->syncing = 1;
    r->ever_synced = 1;
    unlock(r);
    ev->kind = WS_RECV_MANIFEST;
    ev->weight_version = version;
    return send_ack(r, WS_MSG_MANIFEST, WS_ACK_NO_SLOT, 0, "acknowledging the manifest");
}

typedef struct ipc_map {
    ws_device *dev;
    void *ptr;
} ipc_map;

static void close_ipc_map(void *ctx)
{
    ipc_map *im = ctx;
    im->dev->ops->ipc_close(im->dev, im->ptr);
    free(im);
}

/* Slots in the sender's GPU memory (CUDA IPC handles), mapped on the GPU
 * this receiver's tensors are on. */
static ws_status map_gpu_slots(ws_receiver *r, ws_rbuf *rb, const uint64_t *bytes)
{
    const char *peer = ws_chan_peer_label(r->chan);
    ws_device *dev = NULL;
    for (size_t i = 0; i < r->n_params && !dev; i++) {
        ws_device *d = ws_tensor_device(&r->params[i].t);
        if (d->kind != WS_DEVICE_CPU) dev = d;
    }
    if (!dev || !dev->ops->ipc_open)
        return WS_ERR(WS_ERR_ARG, "receiver: %s sent slots in GPU memory, but this %s's tensors "
                      "are in host memory; give the sender host slots", peer, r->role);
    unsigned char handle[WS_REMOTE_SLOTS][WS_IPC_HANDLE_BYTES];
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) ws_rbuf_get(rb, handle[i], WS_IPC_HANDLE_BYTES);
    if (rb->bad || rb->pos != rb->len)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed SLOTS message", peer);
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) {
        ipc_map *im = ws_calloc(1, sizeof *im);
        ws_status rc = im ? WS_OK : WS_ERR(WS_ERR_NOMEM, "receiver: out of memory");
        if (rc == WS_OK) rc = dev->ops->ipc_open(dev, handle[i], (size_t)bytes[i], &im->ptr);
        if (rc == WS_OK) {
            im->dev = dev;
            ws_external mem = {.data = im->ptr, .nbytes = (size_t)bytes[i], .device = dev,
                               .read_only = 1, .source = "a shared slot of the sender",
                               .release = close_ipc_map, .release_ctx = im};
            int64_t len = (int64_t)bytes[i];
            char what[32];
            snprintf(what, sizeof what, "slot %d", i);
            rc = ws_tensor_external(&r->slot[i], &mem, WS_U8, 1, &len, what);
            if (rc != WS_OK) close_ipc_map(im);
        } else {
            free(im);
        }
        if (rc != WS_OK) {
            unmap_slots(r);
            return rc;
        }
    }
    r->slot_dev = dev;
    return WS_OK;
}

static ws_status on_slots(ws_receiver *r, ws_chan_msg *m, ws_receiver_event *ev)
{
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    uint32_t n = ws_rbuf_u32(&rb);
    uint64_t bytes[WS_REMOTE_SLOTS] = {0};
    for (uint32_t i = 0; i < n && i < WS_REMOTE_SLOTS; i++) bytes[i] = ws_rbuf_u64(&rb);
    uint8_t kind = ws_rbuf_u8(&rb);
    if (!rb.bad && kind == WS_SLOTS_GPU && n == WS_REMOTE_SLOTS && m->nfds == 0 && !r->n_slots) {
        WS_TRY(map_gpu_slots(r, &rb, bytes));
        r->n_slots = WS_REMOTE_SLOTS;
        ev->kind = WS_RECV_SLOTS;
        return send_ack(r, WS_MSG_SLOTS, WS_ACK_NO_SLOT, 0, "acknowledging the slots");
    }
    if (rb.bad || kind != WS_SLOTS_HOST || n != WS_REMOTE_SLOTS || m->nfds != (int)n ||
        r->n_slots)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed SLOTS message (%u slots, "
                      "%d fds%s)", ws_chan_peer_label(r->chan), n, m->nfds,
                      r->n_slots ? ", slots already mapped" : "");
    for (int i = 0; i < WS_REMOTE_SLOTS; i++) {
        char what[96];
        snprintf(what, sizeof what, "receiver: slot %d from %s", i, ws_chan_peer_label(r->chan));
        int fd = m->fds[i];
        m->fds[i] = -1;
        ws_status rc = bytes[i] > SIZE_MAX ? WS_ERR(WS_ERR_FORMAT, "%s: too large", what)
                                           : ws_shm_map(&r->shm[i], fd, (size_t)bytes[i], what);
        if (rc == WS_OK) {
            ws_external mem = {.data = r->shm[i].data, .nbytes = r->shm[i].nbytes,
                               .read_only = 1, .source = "a shared slot of the sender"};
            int64_t len = (int64_t)r->shm[i].nbytes;
            snprintf(what, sizeof what, "slot %d", i);
            rc = ws_tensor_external(&r->slot[i], &mem, WS_U8, 1, &len, what);
        }
        if (rc != WS_OK) {
            if (bytes[i] > SIZE_MAX) close(fd);
            unmap_slots(r);
            return rc;
        }
    }
    r->n_slots = WS_REMOTE_SLOTS;
    ev->kind = WS_RECV_SLOTS;
    return send_ack(r, WS_MSG_SLOTS, WS_ACK_NO_SLOT, 0, "acknowledging the slots");
}

/* Elements [off, off+count) of param t, as a stack view (no reference). */
static ws_tensor element_range(const ws_tensor *t, uint64_t off, uint64_t count)
{
    ws_tensor v = *t;
    v.offset = t->offset + (size_t)off * ws_dtype_size(t->dtype);
    int64_t n = (int64_t)count;
    ws_layout_contiguous(&v.layout, 1, &n);
    return v;
}

/* One piece of a bucket, or a chunk of one: elements [first, +count) of
 * manifest entry `entry`, at byte `at` of the slot; `sum` its checksum once
 * landed. */
typedef struct landing {
    ws_tensor view;
    uint32_t entry;
    uint64_t first;
    size_t at, bytes;
    uint64_t sum;
} landing;

#define LAND_GROUP 64 /* landings per ws_unpack call */

/* Copies landings [0, k) out of the slot and checksums each right after. */
static ws_status land_group(const ws_tensor *sl, landing *ls, size_t k, int sum)
{
    ws_tensor *dsts[LAND_GROUP] = {0};
    size_t offsets[LAND_GROUP] = {0};
    for (size_t i = 0; i < k && i < LAND_GROUP; i++) {
        dsts[i] = &ls[i].view;
        offsets[i] = ls[i].at;
    }
    WS_TRY(ws_unpack(sl, dsts, k, offsets));
    for (size_t i = 0; sum && i < k; i++)
        WS_TRY(ws_tensor_checksum(dsts[i], ls[i].first, dsts[i]->dtype, &ls[i].sum));
    return WS_OK;
}

#define LAND_WHY_BYTES 256

typedef struct land_ctx {
    const ws_tensor *sl;
    landing *ls;
    const size_t *group; /* group g is landings [group[g], group[g + 1]) */
    int sum;
    ws_status *rc;
    char (*why)[LAND_WHY_BYTES]; /* a failed group's message, taken on its thread */
} land_ctx;

static void land_range(void *ctx, size_t begin, size_t end, int worker)
{
    land_ctx *c = ctx;
    (void)worker;
    for (size_t g = begin; g < end; g++) {
        c->rc[g] = land_group(c->sl, c->ls + c->group[g], c->group[g + 1] - c->group[g], c->sum);
        if (c->rc[g] != WS_OK) snprintf(c->why[g], LAND_WHY_BYTES, "%s", ws_errmsg());
    }
}

/* Copies the landings out of slot `sl` into their tensors and, with `sum`,
 * adds each one's checksum to its tensor's landed sum. On the host the
 * landings are chunks of at most LAND_CHUNK_BYTES, gathered into groups of
 * about that size; each group is copied and checksummed by one thread while
 * its bytes are in that core's cache, the groups spread over the threads
 * (parallel.h). Tensors in pool storage keep the groups on this thread: the
 * pool's record of what was written is not shared between threads. */
static ws_status land(ws_receiver *r, const ws_tensor *sl, landing *ls, size_t n, int on_host,
                      int sum)
{
    ws_status rc = WS_OK;
    if (on_host) {
        size_t *group = ws_malloc((n + 1) * sizeof *group);
        ws_status *rcs = ws_calloc(n ? n : 1, sizeof *rcs);
        char(*why)[LAND_WHY_BYTES] = ws_calloc(n ? n : 1, sizeof *why);
        if (!group || !rcs || !why) rc = WS_ERR(WS_ERR_NOMEM, "out of memory for %zu chunks", n);
        size_t n_groups = 0;
        int shared = 1;
        for (size_t i = 0; rc == WS_OK && i < n; n_groups++) {
            group[n_groups] = i;
            size_t bytes = 0, k = 0;
            while (i < n && k < LAND_GROUP && (k == 0 || bytes + ls[i].bytes <= LAND_CHUNK_BYTES)) {
                if (ls[i].view.storage->kind == WS_STORAGE_POOL) shared = 0;
                bytes += ls[i].bytes;
                i++;
                k++;
            }
        }
        if (rc == WS_OK) {
            group[n_groups] = n;
            land_ctx c = {sl, ls, group, sum, rcs, why};
            if (shared) ws_parallel_for(n_groups, 1, land_range, &c);
            else land_range(&c, 0, n_groups, 0);
        }
        /* A worker's error is on its thread: the first failed group's
         * message, taken there, says why. */
        for (size_t g = 0; rc == WS_OK && g < n_groups; g++) {
            if (rcs[g] == WS_OK) continue;
            rc = WS_ERR(rcs[g], "copying elements [%" PRIu64 ", ...) of manifest tensor #%u: %s",
                        ls[group[g]].first, ls[group[g]].entry + 1, why[g]);
        }
        free(group);
        free(rcs);
        free(why);
    } else {
        /* Another device: one copy per piece from a typed view of the slot. A
         * copy that reads host memory has finished when it returns
         * (device.h), so the slot may be reused after the ACK. */
        for (size_t i = 0; rc == WS_OK && i < n; i++) {
            ws_tensor src = *sl;
            src.dtype = ls[i].view.dtype;
            src.offset = sl->offset + ls[i].at;
            src.layout = ls[i].view.layout;
            rc = ws_tensor_copy(&ls[i].view, &src);
            if (rc == WS_OK && sum)
                rc = ws_tensor_checksum(&ls[i].view, ls[i].first, ls[i].view.dtype, &ls[i].sum);
        }
        /* A copy between two GPUs runs on the destination's: before the
         * acknowledgement frees the slot, or a failure unmaps it, every GPU
         * that read it must be done (the slot's own GPU is synchronized by
         * the caller). The first error stays the answer. */
        ws_device *synced[8];
        size_t n_synced = 0;
        for (size_t i = 0; i < n; i++) {
            ws_device *d = ws_tensor_device(&ls[i].view);
            if (d->kind == WS_DEVICE_CPU || d == r->slot_dev) continue;
            size_t j = 0;
            while (j < n_synced && synced[j] != d) j++;
            if (j < n_synced) continue;
            ws_status s = ws_device_synchronize(d);
            if (rc == WS_OK) rc = s;
            if (n_synced < sizeof synced / sizeof *synced) synced[n_synced++] = d;
        }
    }
    for (size_t i = 0; rc == WS_OK && sum && i < n; i++) r->sync_landed[ls[i].entry] += ls[i].sum;
    return rc;
}

static ws_status on_bucket(ws_receiver *r, const ws_chan_msg *m, ws_receiver_event *ev)
{
    const char *peer = ws_chan_peer_label(r->chan);
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    uint64_t seq = ws_rbuf_u64(&rb);
    uint32_t slot = ws_rbuf_u32(&rb), n = ws_rbuf_u32(&rb);
    if (rb.bad || (size_t)n * 28 != m->len - rb.pos)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed BUCKET", peer);
    if (r->syncing && (r->sync_flags & WS_MANIFEST_DIRECT))
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a BUCKET in a direct sync (its tensors "
                      "are written in place)", peer);
    if (!r->syncing || !r->n_slots || slot >= WS_REMOTE_SLOTS || seq != r->next_seq)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent bucket %" PRIu64 " for slot %u %s",
                      peer, seq + 1, slot,
                      !r->syncing ? "outside a sync" : !r->n_slots ? "before its slots"
                      : slot >= WS_REMOTE_SLOTS ? "(no such slot)" : "out of order");
    const ws_tensor *sl = &r->slot[slot];
    size_t slot_bytes = ws_tensor_nbytes(sl), bytes = 0; /* a memfd or a GPU's IPC slot */
    /* Batched host copies need the slot and every tensor in host memory. */
    int on_host = !r->slot_dev, sum = !(r->sync_flags & WS_MANIFEST_UNPROVEN);
    /* Check every piece before a byte is copied; count the chunks. */
    size_t n_land = 0;
    ws_rbuf check = rb;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t ti = ws_rbuf_u32(&check);
        uint64_t off = ws_rbuf_u64(&check), count = ws_rbuf_u64(&check);
        uint64_t at = ws_rbuf_u64(&check);
        if (ti >= r->n_sync)
            return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent piece %u of bucket %" PRIu64 " for "
                          "tensor #%u; the manifest has %zu", peer, i + 1, seq + 1, ti,
                          r->n_sync);
        const ws_tensor *t = &r->params[r->sync_param[ti]].t;
        uint64_t numel = (uint64_t)ws_tensor_numel(t), esize = ws_dtype_size(t->dtype);
        if (off > numel || count > numel - off || at > slot_bytes ||
            count > (slot_bytes - at) / esize)
            return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent piece %u of bucket %" PRIu64 " for "
                          "'%s' out of range: elements [%" PRIu64 ", +%" PRIu64 ") of %" PRIu64
                          " at byte %" PRIu64 " of a slot of %zu", peer, i + 1, seq + 1,
                          r->params[r->sync_param[ti]].name, off, count, numel, at, slot_bytes);
        if (ws_tensor_device(t)->kind != WS_DEVICE_CPU) on_host = 0;
        n_land += (size_t)(count * esize / LAND_CHUNK_BYTES) + 1;
    }
    if (!on_host) n_land = n;
    if (r->n_ranges + n > r->cap_ranges) {
        size_t cap = r->cap_ranges ? r->cap_ranges : 64;
        while (cap < r->n_ranges + n) cap *= 2;
        recv_range *grown = ws_realloc(r->sync_ranges, cap * sizeof *grown);
        if (!grown)
            return WS_ERR(WS_ERR_NOMEM, "receiver: out of memory for a bucket of %u pieces", n);
        r->sync_ranges = grown;
        r->cap_ranges = cap;
    }
    landing *ls = ws_calloc(n_land ? n_land : 1, sizeof *ls);
    if (!ls) return WS_ERR(WS_ERR_NOMEM, "receiver: out of memory for a bucket of %u pieces", n);
    size_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t ti = ws_rbuf_u32(&rb);
        uint64_t off = ws_rbuf_u64(&rb), count = ws_rbuf_u64(&rb), at = ws_rbuf_u64(&rb);
        const ws_tensor *t = &r->params[r->sync_param[ti]].t;
        uint64_t esize = ws_dtype_size(t->dtype);
        uint64_t step = on_host ? LAND_CHUNK_BYTES / esize : count;
        for (uint64_t done = 0; done < count; done += step) { /* none for an empty piece */
            uint64_t c = count - done < step ? count - done : step;
            ls[k++] = (landing){element_range(t, off + done, c), ti, off + done,
                                (size_t)(at + done * esize), (size_t)(c * esize), 0};
        }
        bytes += (size_t)(count * esize);
        r->sync_received[ti] += count;
        if (count) r->sync_ranges[r->n_ranges++] = (recv_range){ti, off, count};
    }
    ws_status rc = land(r, sl, ls, k, on_host, sum);
    free(ls);
    /* A slot in the sender's GPU memory is free again (or, after a failure,
     * unmapped) only once the copies out of it are done, not merely queued. */
    if (r->slot_dev) {
        ws_status s = ws_device_synchronize(r->slot_dev);
        if (rc == WS_OK) rc = s;
    }
    if (rc != WS_OK) {
        ws_errprefix("receiver: bucket %" PRIu64, seq + 1);
        return rc;
    }
    r->next_seq++;
    ev->kind = WS_RECV_BUCKET;
    ev->pieces = n;
    ev->bytes = bytes;
    return send_ack(r, WS_MSG_BUCKET, slot, seq, "acknowledging a bucket");
}

/* " (from 'label')", or "" without a label. */
static const char *label_part(char *buf, size_t n, const char *label)
{
    if (!label) return "";
    snprintf(buf, n, " (from '%s')", label);
    return buf;
}

/* Checks a FINISH's proofs against the landed sums. On a mismatch,
 * checksums the ranges afresh to name the first that differs. */
static ws_status check_proofs(ws_receiver *r, ws_rbuf *rb, uint32_t n)
{
    const char *peer = ws_chan_peer_label(r->chan);
    size_t *entry_of = ws_malloc((r->n_params ? r->n_params : 1) * sizeof *entry_of);
    ws_proof *proofs = ws_calloc(n ? n : 1, sizeof *proofs);
    size_t *entries = ws_calloc(n ? n : 1, sizeof *entries);
    uint64_t *covered = ws_calloc(r->n_sync ? r->n_sync : 1, sizeof *covered);
    uint64_t *proven = ws_calloc(r->n_sync ? r->n_sync : 1, sizeof *proven);
    ws_status rc = WS_OK;
    if (!entry_of || !proofs || !entries || !covered || !proven)
        rc = WS_ERR(WS_ERR_NOMEM, "receiver: out of memory for %u proofs", n);
    for (size_t p = 0; rc == WS_OK && p < r->n_params; p++) entry_of[p] = SIZE_MAX;
    for (size_t i = 0; rc == WS_OK && i < r->n_sync; i++) entry_of[r->sync_param[i]] = i;
    char lb[WHY_BYTES];
    for (uint32_t i = 0; rc == WS_OK && i < n; i++) {
        ws_proof pf = proofs[i] = ws_rbuf_proof(rb);
        size_t param;
        if (rb->bad) {
            rc = WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed FINISH (proof %u)", peer,
                        i + 1);
            break;
        }
        if (!ws_strmap_get(&r->index, pf.tensor, &param) || entry_of[param] == SIZE_MAX) {
            rc = WS_ERR(WS_ERR_ARG, "proof %u names tensor '%s'%s, which is not in the "
                        "manifest of this sync", i + 1, pf.tensor,
                        label_part(lb, sizeof lb, pf.label));
            break;
        }
        size_t e = entries[i] = entry_of[param];
        uint64_t numel = (uint64_t)ws_tensor_numel(&r->params[param].t);
        if (pf.elem_offset > numel || pf.elem_count > numel - pf.elem_offset ||
            pf.elem_count > numel - covered[e]) {
            rc = WS_ERR(WS_ERR_ARG, "the proofs of tensor '%s' cover more than its %" PRIu64
                        " elements (proof %u%s: elements [%" PRIu64 ", +%" PRIu64 ")); they "
                        "must cover each tensor exactly once", pf.tensor, numel, i + 1,
                        label_part(lb, sizeof lb, pf.label), pf.elem_offset, pf.elem_count);
            break;
        }
        covered[e] += pf.elem_count;
        proven[e] += pf.checksum;
    }
    if (rc == WS_OK && rb->pos != rb->len)
        rc = WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a FINISH with %zu bytes after its proofs",
                    peer, rb->len - rb->pos);
    /* Counts that add up are not enough: no element may be proven twice. */
    recv_range *pr = rc == WS_OK ? ws_calloc(n ? n : 1, sizeof *pr) : NULL;
    if (rc == WS_OK && !pr) rc = WS_ERR(WS_ERR_NOMEM, "receiver: out of memory for %u proofs", n);
    size_t n_pr = 0;
    for (uint32_t i = 0; rc == WS_OK && i < n; i++)
        if (proofs[i].elem_count)
            pr[n_pr++] = (recv_range){entries[i], proofs[i].elem_offset, proofs[i].elem_count};
    const recv_range *twice = rc == WS_OK ? first_overlap(pr, n_pr) : NULL;
    if (twice)
        rc = WS_ERR(WS_ERR_ARG, "the proofs of tensor '%s' cover elements [%" PRIu64 ", +%" PRIu64
                    ") more than once; they must cover each tensor exactly once",
                    r->params[r->sync_param[twice->entry]].name, twice->off, twice->count);
    free(pr);
    for (size_t e = 0; rc == WS_OK && e < r->n_sync; e++) {
        const recv_param *p = &r->params[r->sync_param[e]];
        uint64_t numel = (uint64_t)ws_tensor_numel(&p->t);
        if (covered[e] != numel)
            rc = WS_ERR(WS_ERR_ARG, "the proofs cover %" PRIu64 " of the %" PRIu64 " elements "
                        "of tensor '%s'; they must cover each tensor exactly once", covered[e],
                        numel, p->name);
    }
    for (size_t e = 0; rc == WS_OK && e < r->n_sync; e++) {
        if (proven[e] == r->sync_landed[e]) continue;
        /* Find the range that differs, reading the tensor again. */
        recv_param *p = &r->params[r->sync_param[e]];
        for (uint32_t i = 0; rc == WS_OK && i < n; i++) {
            if (entries[i] != e) continue;
            ws_tensor v = element_range(&p->t, proofs[i].elem_offset, proofs[i].elem_count);
            uint64_t got;
            rc = ws_tensor_checksum(&v, proofs[i].elem_offset, v.dtype, &got);
            if (rc == WS_OK && got != proofs[i].checksum)
                rc = WS_ERR(WS_ERR_ARG, "tensor '%s'%s, elements [%" PRIu64 ", +%" PRIu64 "), "
                            "holds checksum 0x%016" PRIx64 ", the proof says 0x%016" PRIx64
                            ": the bytes received are not the bytes sent", p->name,
                            label_part(lb, sizeof lb, proofs[i].label), proofs[i].elem_offset,
                            proofs[i].elem_count, got, proofs[i].checksum);
        }
        /* Every range matches now: the bytes changed after they landed. */
        if (rc == WS_OK)
            rc = WS_ERR(WS_ERR_ARG, "tensor '%s' received bytes whose checksum 0x%016" PRIx64
                        " is not the sum of its proofs, 0x%016" PRIx64 "; it was written "
                        "while the sync ran", p->name, r->sync_landed[e], proven[e]);
    }
    free(entry_of);
    free(proofs);
    free(entries);
    free(covered);
    free(proven);
    return rc;
}

static ws_status on_finish(ws_receiver *r, const ws_chan_msg *m, ws_receiver_event *ev)
{
    const char *peer = ws_chan_peer_label(r->chan);
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    uint64_t version = ws_rbuf_u64(&rb);
    uint32_t n = ws_rbuf_proof_count(&rb);
    if (rb.bad || !r->syncing || version != r->version)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed FINISH, or one that does "
                      "not match its manifest (weight version %" PRIu64 " for %" PRIu64 ")",
                      peer, version, r->version);
    ws_status rc = WS_OK;
    int direct = (r->sync_flags & WS_MANIFEST_DIRECT) != 0;
    for (size_t i = 0; rc == WS_OK && !direct && i < r->n_sync; i++) {
        const recv_param *p = &r->params[r->sync_param[i]];
        uint64_t numel = (uint64_t)ws_tensor_numel(&p->t);
        if (r->sync_received[i] != numel)
            rc = WS_ERR(WS_ERR_ARG, "tensor '%s' received %" PRIu64 " of its %" PRIu64
                        " elements", p->name, r->sync_received[i], numel);
    }
    const recv_range *twice = rc == WS_OK ? first_overlap(r->sync_ranges, r->n_ranges) : NULL;
    if (twice)
        rc = WS_ERR(WS_ERR_ARG, "tensor '%s': elements [%" PRIu64 ", +%" PRIu64 ") arrived "
                    "more than once (pieces overlap), so some of its elements never did",
                    r->params[r->sync_param[twice->entry]].name, twice->off, twice->count);
    if (rc == WS_OK && n && (r->sync_flags & WS_MANIFEST_UNPROVEN))
        rc = WS_ERR(WS_ERR_ARG, "%u proofs came for a sync whose manifest said none would "
                    "(WS_MANIFEST_UNPROVEN): nothing was checksummed as it landed", n);
    /* Written in place by the sender: what each tensor holds now is what
     * landed (one read of it, as the checksums of what lands cost). */
    for (size_t i = 0; rc == WS_OK && direct && n && i < r->n_sync; i++) {
        const recv_param *p = &r->params[r->sync_param[i]];
        rc = ws_tensor_checksum(&p->t, 0, p->t.dtype, &r->sync_landed[i]);
    }
    if (rc == WS_OK && n) rc = check_proofs(r, &rb, n);
    if (rc != WS_OK) {
        /* A well-formed FINISH that fails ends the sync; the sender hears why
         * and the connection lives on. */
        if (rc == WS_ERR_FORMAT) return rc;
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", ws_errmsg());
        fail_sync(r, msg);
        WS_ERR(rc, "sync of weight version %" PRIu64 ": %s; the tensors of that sync are "
               "marked invalid", version, msg);
        r->refused = 1;
        return rc;
    }
    end_sync(r, 1);
    ev->kind = WS_RECV_SYNCED;
    ev->weight_version = version;
    return send_ack(r, WS_MSG_FINISH, WS_ACK_NO_SLOT, 0, "acknowledging the checksums");
}

/* Checks that the named tensors are valid and, unless only validity is
 * asked, that their ranges' checksums equal the proofs'. A range that
 * differs marks its tensor invalid. */
static ws_status on_verify(ws_receiver *r, const ws_chan_msg *m, ws_receiver_event *ev)
{
    const char *peer = ws_chan_peer_label(r->chan);
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    uint32_t flags = ws_rbuf_u32(&rb);
    uint32_t n = ws_rbuf_proof_count(&rb);
    if (rb.bad || r->syncing)
        return WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed VERIFY%s", peer,
                      r->syncing ? " (inside a sync)" : "");
    ws_proof *proofs = ws_calloc(n ? n : 1, sizeof *proofs);
    size_t *params = ws_calloc(n ? n : 1, sizeof *params);
    ws_tensor *views = ws_calloc(n ? n : 1, sizeof *views);
    const ws_tensor **ts = ws_calloc(n ? n : 1, sizeof *ts);
    uint64_t *first = ws_calloc(n ? n : 1, sizeof *first);
    uint64_t *got = ws_calloc(n ? n : 1, sizeof *got);
    ws_status rc = WS_OK;
    if (!proofs || !params || !views || !ts || !first || !got)
        rc = WS_ERR(WS_ERR_NOMEM, "receiver: out of memory for a VERIFY of %u ranges", n);
    /* The first proof that names an unknown or invalid tensor, or a range
     * outside it: `bad`, its error kept in `bad_msg`. */
    uint32_t bad = n;
    ws_status bad_rc = WS_OK;
    char bad_msg[1024] = "", lb[WHY_BYTES];
    for (uint32_t i = 0; rc == WS_OK && i < n; i++) {
        proofs[i] = ws_rbuf_proof(&rb);
        if (rb.bad) {
            rc = WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a malformed VERIFY (proof %u)", peer,
                        i + 1);
            break;
        }
        if (bad < n) continue;
        const ws_proof *pf = &proofs[i];
        if (!r->n_params || !ws_strmap_get(&r->index, pf->tensor, &params[i])) {
            bad_rc = WS_ERR(WS_ERR_ARG, "%s tensor '%s'%s: no such tensor in this %s",
                            r->role, pf->tensor, label_part(lb, sizeof lb, pf->label),
                            r->role);
        } else {
            const recv_param *p = &r->params[params[i]];
            uint64_t numel = (uint64_t)ws_tensor_numel(&p->t);
            if (!p->valid)
                bad_rc = WS_ERR(WS_ERR_ARG, "%s tensor '%s'%s is not valid: %s", r->role,
                                p->name, label_part(lb, sizeof lb, pf->label), p->why);
            else if (!(flags & WS_VERIFY_VALIDITY) &&
                     (pf->elem_offset > numel || pf->elem_count > numel - pf->elem_offset))
                bad_rc = WS_ERR(WS_ERR_ARG, "%s tensor '%s'%s: elements [%" PRIu64 ", +%"
                                PRIu64 ") are outside its %" PRIu64, r->role, p->name,
                                label_part(lb, sizeof lb, pf->label), pf->elem_offset,
                                pf->elem_count, numel);
            else {
                views[i] = element_range(&p->t, pf->elem_offset, pf->elem_count);
                ts[i] = &views[i];
                first[i] = pf->elem_offset;
            }
        }
        if (bad_rc != WS_OK) {
            bad = i;
            snprintf(bad_msg, sizeof bad_msg, "%s", ws_errmsg());
        }
    }
    if (rc == WS_OK && !rb.bad && rb.pos != rb.len)
        rc = WS_ERR(WS_ERR_FORMAT, "receiver: %s sent a VERIFY with %zu bytes after its proofs",
                    peer, rb.len - rb.pos);
    /* Checksums of the ranges before the first bad proof; every range that
     * differs makes its tensor invalid, the first one is the answer. */
    if (rc == WS_OK && !(flags & WS_VERIFY_VALIDITY) && bad > 0)
        rc = ws_checksum_many(ts, bad, first, WS_DTYPE_COUNT, got);
    uint32_t differs = n;
    for (uint32_t i = 0; rc == WS_OK && !(flags & WS_VERIFY_VALIDITY) && i < bad; i++) {
        if (got[i] == proofs[i].checksum) continue;
        recv_param *p = &r->params[params[i]];
        if (differs == n) differs = i;
        if (!p->valid) continue; /* named by an earlier range already */
        invalidate(r, p, "elements [%" PRIu64 ", +%" PRIu64 ")%s held checksum 0x%016" PRIx64
                   ", not 0x%016" PRIx64 ", when verified after weight version %" PRIu64,
                   proofs[i].elem_offset, proofs[i].elem_count,
                   label_part(lb, sizeof lb, proofs[i].label), got[i], proofs[i].checksum,
                   r->valid_version);
    }
    if (rc == WS_OK && differs < n) {
        const ws_proof *pf = &proofs[differs];
        rc = WS_ERR(WS_ERR_ARG, "%s tensor '%s'%s, elements [%" PRIu64 ", +%" PRIu64 "), "
                    "holds checksum 0x%016" PRIx64 ", expected 0x%016" PRIx64 "; it is marked "
                    "invalid", r->role, pf->tensor, label_part(lb, sizeof lb, pf->label),
                    pf->elem_offset, pf->elem_count, got[differs], pf->checksum);
    } else if (rc == WS_OK && bad < n) {
        rc = WS_ERR(bad_rc, "%s", bad_msg);
    }
    free(proofs);
    free(params);
    free(views);
    free(ts);
    free(first);
    free(got);
    if (rc != WS_OK) {
        if (rc != WS_ERR_FORMAT) r->refused = 1;
        ws_errprefix("verify");
        return rc;
    }
    ev->kind = WS_RECV_VERIFIED;
    return send_ack(r, WS_MSG_VERIFY, WS_ACK_NO_SLOT, 0, "acknowledging a verify");
}

static ws_status on_wake_sleep(ws_receiver *r, const ws_chan_msg *m, ws_receiver_event *ev)
{
    ws_rbuf rb = {m->payload, m->len, 0, 0};
    ws_status rc = WS_OK;
    if (m->type == WS_MSG_WAKE) {
        const char *tag = ws_rbuf_str(&rb);
        if (rb.bad) return WS_ERR(WS_ERR_FORMAT, "receiver: malformed WAKE");
        if (r->opts.on_wake) rc = r->opts.on_wake(r->opts.ctx, tag);
        if (rc != WS_OK) ws_errprefix("wake(%s) in the %s", tag, r->role);
        ev->kind = WS_RECV_WAKE;
    } else {
        int32_t level = (int32_t)ws_rbuf_u32(&rb);
        if (rb.bad) return WS_ERR(WS_ERR_FORMAT, "receiver: malformed SLEEP");
        if (r->opts.on_sleep) rc = r->opts.on_sleep(r->opts.ctx, level);
        if (rc != WS_OK) ws_errprefix("sleep(level=%d) in the %s", (int)level, r->role);
        /* Level 2 discards the weights: none holds verified bytes until written again. */
        for (size_t i = 0; rc == WS_OK && level >= 2 && i < r->n_params; i++) {
            invalidate(r, &r->params[i], "discarded by the level-%d sleep after weight version %"
                       PRIu64, (int)level, r->valid_version);
        }
        ev->kind = WS_RECV_SLEEP;
    }
    if (rc != WS_OK) {
        r->refused = 1; /* the callback's failure is the sender's to handle */
        return rc;
    }
    return send_ack(r, m->type, WS_ACK_NO_SLOT, 0, "acknowledging a wake or sleep");
}

ws_status ws_receiver_accept(ws_receiver *r, int timeout_ms)
{
    if (r->chan) return WS_OK;
    WS_TRY(ws_chan_accept(r->listener, timeout_ms, &r->chan));
    ws_chan_set_interrupt(r->chan, r->opts.interrupted, r->opts.ctx);
    ws_chan_msg m;
    ws_status rc = ws_chan_recv(r->chan, r->opts.timeout_ms, &m, "the greeting");
    if (rc == WS_OK && m.type != WS_MSG_HELLO)
        rc = WS_ERR(WS_ERR_FORMAT, "receiver: %s began with %s, not HELLO",
                    ws_chan_peer_label(r->chan), ws_remote_msg_name(m.type));
    if (rc == WS_OK) rc = on_hello(r, &m);
    ws_chan_msg_free(&m);
    if (rc != WS_OK) drop_connection(r);
    return rc;
}

/* A sender leaving (CLOSE) frees its slots once told: a receiver that
 * mapped them from a GPU (CUDA IPC) unmaps them first and answers
 * ACK(CLOSE), since freeing memory another process still has open is
 * undefined. Best effort: the sender may be gone. */
static void let_go(ws_receiver *r)
{
    if (!r->slot_dev || !r->chan) return;
    ws_err_saved e;
    ws_err_save(&e);
    unmap_slots(r);
    (void)ack_within(r, WS_MSG_CLOSE, WS_ACK_NO_SLOT, 0, ERROR_SEND_MS, "acknowledging the close");
    ws_err_restore(&e);
}

ws_status ws_receiver_next(ws_receiver *r, int timeout_ms, ws_receiver_event *ev)
{
    memset(ev, 0, sizeof *ev);
    r->refused = 0;
    if (!r->chan) {
        WS_TRY(ws_receiver_accept(r, timeout_ms));
        ev->kind = WS_RECV_CONNECTED;
        return WS_OK;
    }
    int syncing = r->syncing;
    uint64_t version = r->version;
    if (syncing && (timeout_ms < 0 || timeout_ms > r->opts.timeout_ms))
        timeout_ms = r->opts.timeout_ms;
    char what[96];
    if (syncing)
        snprintf(what, sizeof what, "the sync of weight version %" PRIu64, version);
    else
        snprintf(what, sizeof what, "a wait for the next request");
    ws_chan_msg m;
    ws_status rc = ws_chan_recv(r->chan, timeout_ms, &m, what);
    int fatal = rc != WS_OK && (rc != WS_ERR_TIMEOUT || syncing), closing = 0;
    if (rc == WS_OK) {
        switch (m.type) {
        case WS_MSG_MANIFEST: rc = on_manifest(r, &m, ev); break;
        case WS_MSG_SLOTS: rc = on_slots(r, &m, ev); break;
        case WS_MSG_BUCKET: rc = on_bucket(r, &m, ev); break;
        case WS_MSG_FINISH: rc = on_finish(r, &m, ev); break;
        case WS_MSG_VERIFY: rc = on_verify(r, &m, ev); break;
        case WS_MSG_WAKE:
        case WS_MSG_SLEEP: rc = on_wake_sleep(r, &m, ev); break;
        case WS_MSG_CLOSE:
            closing = 1;
            if (syncing)
                rc = WS_ERR(WS_ERR_COMM, "%s left in the middle of the sync of weight version "
                            "%" PRIu64, ws_chan_peer_label(r->chan), version);
            ev->kind = WS_RECV_CLOSED;
            fatal = 1;
            break;
        default:
            rc = WS_ERR(WS_ERR_FORMAT, "receiver: %s sent an unexpected %s (type %u)",
                        ws_chan_peer_label(r->chan), ws_remote_msg_name(m.type), m.type);
        }
        /* A refused manifest or a failed callback leaves the connection
         * usable; any other error ends it. */
        if (rc != WS_OK && !r->refused) fatal = 1;
        if (rc != WS_OK && r->refused) send_error(r);
    }
    ws_chan_msg_free(&m);
    if (closing) let_go(r);
    if (rc != WS_OK && fatal) {
        if (r->syncing) {
            send_error(r);
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", ws_errmsg());
            fail_sync(r, msg);
            WS_ERR(rc, "%s; the tensors of that sync are marked invalid", msg);
        } else if (!closing) {
            send_error(r);
        }
        drop_connection(r);
    } else if (fatal) {
        drop_connection(r); /* a clean CLOSE */
    }
    return rc;
}

ws_status ws_receiver_serve(ws_receiver *r, int timeout_ms)
{
    for (;;) {
        ws_receiver_event ev;
        ws_status rc = ws_receiver_next(r, timeout_ms, &ev);
        /* A refused request is the sender's error to handle; it was told. */
        if (rc != WS_OK && !r->refused) return rc;
        if (rc == WS_OK && ev.kind == WS_RECV_CLOSED) return WS_OK;
    }
}
