/* plan.c: sync plans, the bucketed transfer engine (see plan.h).
 *
 * ws_plan_add only validates and records entries; the first execution after
 * an add plans: it lays every shard out as pieces of per-rank segments
 * (buckets), allocates the staging buffers and precomputes the descriptor
 * arrays, so an execution is a loop of copy_batch / all_gather / copy_batch
 * calls with no per-tensor decisions left in it. Descriptors hold raw
 * addresses, taken from ws_tensor_access by the checks every execution
 * starts with: the plan keeps a reference to every storage, and pool
 * storage keeps its addresses across sleeps, so the addresses stay valid.
 * While it executes, the plan holds every pool its entries live in, so a
 * progress callback cannot put one to sleep (or free it) under the copies. */
#include "plan.h"

#include "pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fault.h"
#include "remote.h"

/* Pieces in a gathered segment start on this boundary so every piece is
 * aligned for the widest vector loads of either backend. */
#define PLAN_ALIGN 256
/* Descriptors are split at this size so a backend that parallelises over
 * descriptors still spreads one large tensor over all its threads. */
#define PLAN_CHUNK_BYTES ((size_t)2 << 20)
#define NO_NAME SIZE_MAX
#define PLAN_NAME_CAP 64

/* One side of an entry: just enough to rebuild a flat view for checks and
 * messages (names live in the plan's name arena). */
typedef struct plan_side {
    ws_storage *storage;
    size_t offset;
    size_t name;
    ws_dtype dtype;
    char *base; /* from ws_tensor_access in check_ready; NULL before */
} plan_side;

typedef struct plan_entry {
    plan_side src, dst;
    int64_t numel; /* full tensor */
    int64_t shard;     /* elements of every rank's shard (FSDP: ceil(numel / world)) */
    int64_t src_numel; /* elements this rank's src holds: shard, or its real ones */
    ws_plan_block block; /* cols == 0: the whole tensor */
    int64_t dst_numel;   /* numel, or the block's elements */
    uint32_t target;     /* server mode: manifest index of the engine tensor */
    int64_t target_offset; /* server mode: its element where the parameter starts */
} plan_entry;

/* Elements of block b with a flat index below x (no block, cols == 0: x
 * itself). */
static int64_t elems_below(const ws_plan_block *b, int64_t x)
{
    if (b->cols == 0) return x;
    int64_t i = x / b->cols, j = x % b->cols, w = b->col_end - b->col_begin;
    if (i < b->row_begin) return 0;
    if (i >= b->row_end) return (b->row_end - b->row_begin) * w;
    int64_t in_row = j < b->col_begin ? 0 : j > b->col_end ? w : j - b->col_begin;
    return (i - b->row_begin) * w + in_row;
}

/* The same for the entry's destination block. */
static int64_t block_below(const plan_entry *e, int64_t x) { return elems_below(&e->block, x); }

/* Elements [a, b) of an entry's shard placed at byte `off` of a segment. */
typedef struct plan_piece {
    size_t entry;
    int64_t a, b;
    size_t off;
} plan_piece;

typedef struct plan_bucket {
    size_t piece_begin, piece_end; /* planning only */
    size_t pack_begin, pack_end;   /* into p->pack */
    size_t out_begin, out_end;     /* into p->out: unpack, or direct copies */
    size_t wire_begin, wire_end;   /* into p->wire: server mode's pieces */
    size_t msg_begin, msg_end;     /* into p->msgs: a direct plan's messages */
    size_t seg_used;               /* bytes per rank gathered for this bucket */
    size_t entries_done;           /* entries complete once this bucket is out */
    size_t bytes_done;             /* destination bytes written up to this bucket */
} plan_bucket;

struct ws_plan {
    char name[PLAN_NAME_CAP];
    ws_comm *comm;
    int world, rank;
    ws_plan_role role;
    ws_comm *relay; /* the broadcast to engine ranks (disaggregated); NULL: none here */
    ws_comm *peers; /* disaggregated: every trainer and engine rank (ws_plan_set_peers) */
    ws_device *device;
    size_t bucket_bytes, seg_bytes;

    plan_entry *entries;
    size_t n_entries, cap_entries;
    char *names;
    size_t names_len, names_cap;
    size_t bytes_total; /* destination bytes per execution */
    ws_pool **pools;    /* every pool an entry lives in, once */
    size_t n_pools, cap_pools;

    int planned;
    plan_bucket *buckets;
    size_t n_buckets;
    ws_copy_desc *pack, *out;
    size_t n_pack, n_out;
    ws_sender *sender;     /* server mode: the engine process's connection */
    void *slot_base[2];    /* its slots' mappings when planned (the descriptors' addresses) */
    size_t slot_bytes;
    ws_wire_piece *wire;   /* server mode: every bucket's pieces, as BUCKET carries them */
    size_t n_wire, wire_bytes;
    ws_tensor send[2], recv[2]; /* staging pairs, kept between executions */
    size_t staged_seg;          /* bytes per rank in each staging pair */
    int pairs;

    ws_plan_stats stats;

    /* The exchange (see plan.h), planned by plan_exchange on top of the
     * gather's buckets; x_on: its descriptors replaced the gather's. */
    ws_plan_exchange exchange;
    int x_planned, x_on;
    size_t *x_counts;           /* per bucket 4 x world: send counts, displs, recv counts, displs */
    ws_tensor x_send[2], x_recv[2];
    int x_pairs;
    /* Direct: the exchange's parts (x_on too) or the relay's buckets as
     * messages over x_comm, no staging; x_shards: a relay's trainer ranks
     * send their shards themselves (no gather). */
    int x_direct, x_shards;
    ws_comm *x_comm;
    ws_comm_msg *msgs;
    size_t n_msgs;
    ws_comm_run *runs;
};

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* A flat view of one side, borrowed (no reference taken, never released). */
static void side_view(const ws_plan *p, const plan_side *s, int64_t numel, ws_tensor *out)
{
    memset(out, 0, sizeof *out);
    out->storage = s->storage;
    out->offset = s->offset;
    out->dtype = s->dtype;
    out->layout.ndim = 1;
    out->layout.shape[0] = numel;
    out->layout.strides[0] = 1;
    out->name = s->name == NO_NAME ? NULL : p->names + s->name;
}

static void *side_ptr(const plan_side *s, int64_t elem)
{
    return s->base + (size_t)elem * ws_dtype_size(s->dtype);
}

ws_status ws_plan_create(ws_comm *comm, ws_device *device, size_t bucket_bytes, const char *name,
                         ws_plan **out)
{
    *out = NULL;
    const char *nm = name ? name : "plan";
    if (!device) return WS_ERR(WS_ERR_ARG, "plan '%s': no device given", nm);
    int world = comm ? ws_comm_size(comm) : 1;
    /* Each rank's segment must hold at least one aligned piece. */
    if (bucket_bytes < (size_t)world * PLAN_ALIGN)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': bucket of %zu bytes is too small for a world of %d; use at "
                      "least %zu bytes (%d x %d)",
                      nm, bucket_bytes, world, (size_t)world * PLAN_ALIGN, world, PLAN_ALIGN);
    ws_plan *p = ws_calloc(1, sizeof *p);
    if (!p) return WS_ERR(WS_ERR_NOMEM, "plan '%s': out of host memory", nm);
    snprintf(p->name, sizeof p->name, "%s", nm);
    p->comm = world > 1 ? comm : NULL;
    p->world = world;
    p->rank = comm ? ws_comm_rank(comm) : 0;
    p->device = device;
    p->bucket_bytes = bucket_bytes;
    p->seg_bytes = world > 1 ? bucket_bytes / (size_t)world / PLAN_ALIGN * PLAN_ALIGN : bucket_bytes;
    *out = p;
    return WS_OK;
}

ws_status ws_plan_set_relay(ws_plan *p, ws_plan_role role, ws_comm *relay, int gather_world)
{
    if (p->n_entries)
        return WS_ERR(WS_ERR_ARG, "plan '%s': set the relay before adding entries", p->name);
    if (role != WS_PLAN_SENDER && role != WS_PLAN_RECEIVER)
        return WS_ERR(WS_ERR_ARG, "plan '%s': relay role %d is neither sender nor receiver",
                      p->name, (int)role);
    if (role == WS_PLAN_RECEIVER && (!relay || ws_comm_rank(relay) == 0))
        return WS_ERR(WS_ERR_ARG, "plan '%s': a receiver needs the relay comm, where rank 0 is "
                                  "the sender", p->name);
    if (role == WS_PLAN_SENDER && relay && ws_comm_rank(relay) != 0)
        return WS_ERR(WS_ERR_ARG, "plan '%s': the sender must be rank 0 of the relay comm",
                      p->name);
    if (role == WS_PLAN_SENDER && gather_world != p->world)
        return WS_ERR(WS_ERR_ARG, "plan '%s': the sender gathers over its comm of %d ranks, "
                                  "not %d", p->name, p->world, gather_world);
    if (gather_world < 1 || p->bucket_bytes < (size_t)gather_world * PLAN_ALIGN)
        return WS_ERR(WS_ERR_ARG, "plan '%s': bucket of %zu bytes is too small for %d trainer "
                                  "ranks", p->name, p->bucket_bytes, gather_world);
    p->role = role;
    p->relay = relay;
    if (role == WS_PLAN_RECEIVER) {
        p->comm = NULL;
        p->world = gather_world;
        p->rank = -1; /* holds no shard */
    }
    p->seg_bytes = p->bucket_bytes / (size_t)p->world / PLAN_ALIGN * PLAN_ALIGN;
    return WS_OK;
}

ws_status ws_plan_set_peers(ws_plan *p, ws_comm *all)
{
    if (p->role != WS_PLAN_SENDER && p->role != WS_PLAN_RECEIVER)
        return WS_ERR(WS_ERR_ARG, "plan '%s': peers are for a relay's sender or receiver (set "
                                  "the relay first)", p->name);
    int r = ws_comm_rank(all), n = ws_comm_size(all);
    if (p->role == WS_PLAN_SENDER && r != p->rank)
        return WS_ERR(WS_ERR_ARG, "plan '%s': trainer rank %d is rank %d of the peers' comm; "
                                  "the trainer ranks come first, in order", p->name, p->rank, r);
    if (p->role == WS_PLAN_RECEIVER && (r < p->world || n <= p->world))
        return WS_ERR(WS_ERR_ARG, "plan '%s': an engine rank is rank %d of the peers' comm of "
                                  "%d; the %d trainer ranks come first", p->name, r, n, p->world);
    if (p->n_entries) p->planned = 0;
    p->peers = all;
    return WS_OK;
}

ws_status ws_plan_set_remote(ws_plan *p, ws_sender *sender)
{
    if (p->n_entries)
        return WS_ERR(WS_ERR_ARG, "plan '%s': set the engine process before adding entries",
                      p->name);
    if (!sender) return WS_ERR(WS_ERR_ARG, "plan '%s': no sender given", p->name);
    if (ws_sender_slot_device(sender) != p->device)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': the plan runs on %s but the sender's slots are on %s; give "
                      "the sender slot_device = the plan's device",
                      p->name, p->device->name, ws_sender_slot_device(sender)->name);
    p->role = WS_PLAN_REMOTE;
    p->sender = sender;
    return WS_OK;
}

ws_status ws_plan_set_targets(ws_plan *p, const uint32_t *tensor, const int64_t *offset, size_t n)
{
    if (p->role != WS_PLAN_REMOTE)
        return WS_ERR(WS_ERR_ARG, "plan '%s': targets are for server mode (ws_plan_set_remote)",
                      p->name);
    if (n != p->n_entries)
        return WS_ERR(WS_ERR_ARG, "plan '%s': %zu targets for %zu entries", p->name, n,
                      p->n_entries);
    for (size_t i = 0; i < n; i++) {
        if (offset[i] < 0)
            return WS_ERR(WS_ERR_ARG, "plan '%s': entry %zu: target offset %lld is negative",
                          p->name, i + 1, (long long)offset[i]);
        p->entries[i].target = tensor[i];
        p->entries[i].target_offset = offset[i];
    }
    p->planned = 0;
    return WS_OK;
}

/* Whether execution goes through staging buffers: a gather, or a relay. */
static int staged(const ws_plan *p) { return p->world > 1 || p->role != WS_PLAN_COLOCATED; }

/* Checks one entry before anything is recorded (add is all or nothing). */
static ws_status check_entry(const ws_plan *p, size_t index, const ws_tensor *src,
                             const ws_tensor *dst, int64_t numel, int64_t shard,
                             const ws_plan_block *block)
{
    char a[160], b[160];
    /* A relay's sender has no destinations, its receivers no sources. */
    int need_src = p->role != WS_PLAN_RECEIVER;
    int need_dst = p->role != WS_PLAN_SENDER && p->role != WS_PLAN_REMOTE;
    if ((need_src && !src) || (need_dst && !dst))
        return WS_ERR(WS_ERR_ARG, "plan '%s': entry %zu: %s is NULL", p->name, index,
                      need_src && !src ? "src" : "dst");
    if (!need_src) src = NULL;
    if (!need_dst) dst = NULL;
    ws_status rc = src ? ws_tensor_check_live(src, "src") : WS_OK;
    if (rc == WS_OK && dst) rc = ws_tensor_check_live(dst, "dst");
    if (rc != WS_OK) {
        ws_errprefix("plan '%s': entry %zu", p->name, index);
        return rc;
    }
    if (numel < 0)
        return WS_ERR(WS_ERR_ARG, "plan '%s': entry %zu: numel %lld is negative", p->name,
                      index, (long long)numel);
    int64_t ceil_shard = numel / p->world + (numel % p->world != 0); /* without overflow */
    if (shard == 0) shard = ceil_shard;
    /* A relay's receiver has no src: its shards are the trainer ranks'. */
    const char *slabel = src ? ws_tensor_label(src, a, sizeof a) : "(on the trainer ranks)";
    if (shard > ceil_shard && shard > numel)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': entry %zu: src %s: a shard of %lld elements is larger than the "
                      "%lld-element tensor",
                      p->name, index, slabel, (long long)shard, (long long)numel);
    if (shard < ceil_shard)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': entry %zu: src %s: a shard of %lld elements over %d ranks "
                      "cannot hold the %lld elements of the full tensor",
                      p->name, index, slabel, (long long)shard,
                      p->world, (long long)numel);
    int64_t real = numel - (int64_t)p->rank * shard;
    real = real < 0 ? 0 : real > shard ? shard : real;
    int64_t sn = src ? ws_tensor_numel(src) : shard, dn = 0, want = numel;
    if (dst) dn = ws_tensor_numel(dst);
    if (block && block->cols != 0) {
        const ws_plan_block *bl = block;
        int64_t rows = bl->cols > 0 ? numel / bl->cols : 0;
        if (bl->cols <= 0 || numel % bl->cols != 0 || bl->row_begin < 0 || bl->row_begin > bl->row_end ||
            bl->row_end > rows || bl->col_begin < 0 || bl->col_begin > bl->col_end ||
            bl->col_end > bl->cols)
            return WS_ERR(WS_ERR_ARG,
                          "plan '%s': entry %zu: dst %s: block rows [%lld, %lld) x cols [%lld, "
                          "%lld) does not fit the %lld-element tensor seen as %lld columns",
                          p->name, index, dst ? ws_tensor_label(dst, a, sizeof a) : "-",
                          (long long)bl->row_begin, (long long)bl->row_end,
                          (long long)bl->col_begin, (long long)bl->col_end, (long long)numel,
                          (long long)bl->cols);
        want = (bl->row_end - bl->row_begin) * (bl->col_end - bl->col_begin);
    }
    if (sn != shard && sn != real)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': entry %zu: src %s has %lld elements, expected %lld (rank %d's "
                      "shard of the %lld-element tensor: %lld per rank%s)",
                      p->name, index, ws_tensor_label(src, a, sizeof a), (long long)sn,
                      (long long)shard, p->rank, (long long)numel, (long long)shard,
                      real != shard ? ", or its real elements without the padding" : "");
    if (dst && dn != want)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': entry %zu: dst %s has %lld elements, expected %lld (%s of src "
                      "%s)",
                      p->name, index, ws_tensor_label(dst, a, sizeof a), (long long)dn,
                      (long long)want, want == numel ? "the full tensor" : "its block",
                      src ? ws_tensor_label(src, b, sizeof b) : "(gathered)");
    const ws_tensor *t = src && !ws_tensor_is_contiguous(src)   ? src
                         : dst && !ws_tensor_is_contiguous(dst) ? dst
                                                                : NULL;
    if (t)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': entry %zu: %s %s is not contiguous; pass a contiguous view "
                      "(narrow along the first dimension, or copy it)",
                      p->name, index, t == src ? "src" : "dst", ws_tensor_label(t, a, sizeof a));
    t = src && ws_tensor_device(src) != p->device   ? src
        : dst && ws_tensor_device(dst) != p->device ? dst
                                                    : NULL;
    if (t)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': entry %zu: %s %s is on %s but the plan runs on %s; create the "
                      "plan on that device or move the tensor",
                      p->name, index, t == src ? "src" : "dst", ws_tensor_label(t, a, sizeof a),
                      ws_tensor_device(t)->name, p->device->name);
    return WS_OK;
}

static ws_status grow(void **arr, size_t *cap, size_t need, size_t elem, const char *what)
{
    if (need <= *cap) return WS_OK;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *n = ws_realloc(*arr, c * elem);
    if (!n) return WS_ERR(WS_ERR_NOMEM, "%s: out of host memory (%zu bytes)", what, c * elem);
    *arr = n;
    *cap = c;
    return WS_OK;
}

static void record_side(ws_plan *p, plan_side *s, const ws_tensor *t, ws_dtype wire)
{
    if (!t) { /* the side a relay's rank does not have */
        memset(s, 0, sizeof *s);
        s->name = NO_NAME;
        s->dtype = wire;
        return;
    }
    ws_storage_retain(t->storage);
    s->storage = t->storage;
    s->offset = t->offset;
    s->dtype = t->dtype;
    s->base = NULL;
    if (t->name) {
        size_t len = strlen(t->name) + 1;
        memcpy(p->names + p->names_len, t->name, len);
        s->name = p->names_len;
        p->names_len += len;
    } else {
        s->name = NO_NAME;
    }
}

/* Adds t's pool to p->pools unless it is there (plans touch a few pools). */
static ws_status note_pool(ws_plan *p, const ws_tensor *t)
{
    if (!t || t->storage->kind != WS_STORAGE_POOL) return WS_OK;
    ws_pool *pool = t->storage->pool;
    for (size_t i = p->n_pools; i-- > 0;)
        if (p->pools[i] == pool) return WS_OK;
    WS_TRY(grow((void **)&p->pools, &p->cap_pools, p->n_pools + 1, sizeof *p->pools,
                "plan add"));
    p->pools[p->n_pools++] = pool;
    return WS_OK;
}

ws_status ws_plan_add(ws_plan *p, const ws_tensor *const *srcs, const ws_tensor *const *dsts,
                      const int64_t *numel, size_t n)
{
    return ws_plan_add_sharded(p, srcs, dsts, numel, NULL, n);
}

ws_status ws_plan_add_sharded(ws_plan *p, const ws_tensor *const *srcs,
                              const ws_tensor *const *dsts, const int64_t *numel,
                              const int64_t *shard, size_t n)
{
    return ws_plan_add_blocks(p, srcs, dsts, numel, shard, NULL, NULL, n);
}

ws_status ws_plan_add_blocks(ws_plan *p, const ws_tensor *const *srcs,
                             const ws_tensor *const *dsts, const int64_t *numel,
                             const int64_t *shard, const ws_plan_block *blocks,
                             const ws_dtype *wire, size_t n)
{
    size_t name_bytes = 0;
    /* Only the sides this rank has: a relay's sender no dsts, receivers no srcs. */
    if (p->role == WS_PLAN_SENDER || p->role == WS_PLAN_REMOTE) dsts = NULL;
    if (p->role == WS_PLAN_RECEIVER) srcs = NULL;
    if (!dsts && !wire)
        return WS_ERR(WS_ERR_ARG, "plan '%s': a sender's entries need their wire dtypes",
                      p->name);
    for (size_t i = 0; i < n; i++) {
        const ws_tensor *src = srcs ? srcs[i] : NULL, *dst = dsts ? dsts[i] : NULL;
        WS_TRY(check_entry(p, p->n_entries + i + 1, src, dst, numel[i],
                           shard && shard[i] > 0 ? shard[i] : 0, blocks ? &blocks[i] : NULL));
        if (!dst && (unsigned)wire[i] >= WS_DTYPE_COUNT)
            return WS_ERR(WS_ERR_ARG, "plan '%s': entry %zu: unknown wire dtype %d", p->name,
                          p->n_entries + i + 1, (int)wire[i]);
        if (src && src->name) name_bytes += strlen(src->name) + 1;
        if (dst && dst->name) name_bytes += strlen(dst->name) + 1;
    }
    /* A pool noted for an add that then fails is only held needlessly. */
    for (size_t i = 0; i < n; i++) {
        WS_TRY(note_pool(p, srcs ? srcs[i] : NULL));
        WS_TRY(note_pool(p, dsts ? dsts[i] : NULL));
    }
    WS_TRY(grow((void **)&p->entries, &p->cap_entries, p->n_entries + n, sizeof *p->entries,
                "plan add"));
    WS_TRY(grow((void **)&p->names, &p->names_cap, p->names_len + name_bytes, 1, "plan add"));
    for (size_t i = 0; i < n; i++) {
        plan_entry *e = &p->entries[p->n_entries + i];
        const ws_tensor *dst = dsts ? dsts[i] : NULL;
        ws_dtype wt = dst ? dst->dtype : wire[i];
        record_side(p, &e->src, srcs ? srcs[i] : NULL, wt);
        record_side(p, &e->dst, dst, wt);
        e->numel = numel[i];
        e->shard = shard && shard[i] > 0 ? shard[i]
                                         : numel[i] / p->world + (numel[i] % p->world != 0);
        e->src_numel = srcs ? ws_tensor_numel(srcs[i]) : 0;
        memset(&e->block, 0, sizeof e->block);
        if (blocks && blocks[i].cols != 0) e->block = blocks[i];
        e->dst_numel = dst ? ws_tensor_numel(dst) : 0;
        e->target = 0;
        e->target_offset = 0;
        /* Server mode: what the engine process receives. */
        int64_t lands = p->role == WS_PLAN_REMOTE ? e->numel : e->dst_numel;
        p->bytes_total += (size_t)lands * ws_dtype_size(wt);
    }
    if (n) p->planned = 0;
    p->n_entries += n;
    p->stats.entries = p->n_entries;
    p->stats.bytes_moved = p->bytes_total;
    return WS_OK;
}

/* ---- planning -------------------------------------------------------------------- */

typedef struct vec { void *data; size_t n, cap; } vec;

static ws_status vec_push(vec *v, const void *item, size_t size)
{
    WS_TRY(grow(&v->data, &v->cap, v->n + 1, size, "planning a sync"));
    memcpy((char *)v->data + v->n * size, item, size);
    v->n++;
    return WS_OK;
}

/* Appends dst <- src (count elements), split into chunks. */
static ws_status emit_copy(vec *v, void *dst, ws_dtype dt, const void *src, ws_dtype st,
                           size_t count)
{
    size_t es = ws_dtype_size(dt) > ws_dtype_size(st) ? ws_dtype_size(dt) : ws_dtype_size(st);
    size_t chunk = PLAN_CHUNK_BYTES / es;
    for (size_t done = 0; done < count; done += chunk) {
        ws_copy_desc d = {(char *)dst + done * ws_dtype_size(dt),
                          (const char *)src + done * ws_dtype_size(st),
                          count - done < chunk ? count - done : chunk, dt, st};
        WS_TRY(vec_push(v, &d, sizeof d));
    }
    return WS_OK;
}

/* Walks the entries in order, filling segments of `cap` bytes with pieces
 * of each shard (in destination dtype bytes, starting on `align`). A shard
 * that does not fit is split, so one larger than a bucket is streamed. */
static ws_status lay_out(ws_plan *p, size_t cap, size_t align, vec *pieces, vec *buckets)
{
    plan_bucket cur = {0};
    size_t off = 0, bytes_done = 0;
    int open = 0;
    for (size_t i = 0; i < p->n_entries; i++) {
        const plan_entry *e = &p->entries[i];
        size_t es = ws_dtype_size(e->dst.dtype);
        for (int64_t a = 0; a < e->shard;) {
            size_t o = align_up(off, align);
            size_t avail = o < cap ? (cap - o) / es : 0;
            if (!open || avail == 0) {
                if (open) {
                    cur.piece_end = pieces->n;
                    cur.entries_done = i;
                    cur.bytes_done = bytes_done;
                    WS_TRY(vec_push(buckets, &cur, sizeof cur));
                }
                memset(&cur, 0, sizeof cur);
                cur.piece_begin = pieces->n;
                open = 1;
                o = 0;
                avail = cap / es;
            }
            int64_t take = e->shard - a < (int64_t)avail ? e->shard - a : (int64_t)avail;
            plan_piece pc = {i, a, a + take, o};
            WS_TRY(vec_push(pieces, &pc, sizeof pc));
            off = o + (size_t)take * es;
            if (off > cur.seg_used) cur.seg_used = off;
            /* What this piece writes: its slice of every rank's shard. */
            for (int r = 0; r < p->world; r++) {
                int64_t lo = r * e->shard + a, hi = r * e->shard + a + take;
                if (hi > e->numel) hi = e->numel;
                if (hi > lo) bytes_done += (size_t)(block_below(e, hi) - block_below(e, lo)) * es;
            }
            a += take;
        }
    }
    if (open) {
        cur.piece_end = pieces->n;
        cur.entries_done = p->n_entries;
        cur.bytes_done = bytes_done;
        WS_TRY(vec_push(buckets, &cur, sizeof cur));
    }
    return WS_OK;
}

/* One staging pair: send and recv byte buffers of sn and rn bytes on the
 * plan's device, named for messages ("plan 'base' <kind>send 0"). */
static ws_status new_pair(ws_plan *p, ws_tensor *send, ws_tensor *recv, int64_t sn, int64_t rn,
                          const char *kind, int j)
{
    char nm[PLAN_NAME_CAP + 48];
    ws_tensor_opts opts = {.device = p->device, .name = nm};
    snprintf(nm, sizeof nm, "plan '%s' %ssend %d", p->name, kind, j);
    WS_TRY(ws_tensor_empty(send, WS_U8, 1, &sn, &opts));
    snprintf(nm, sizeof nm, "plan '%s' %srecv %d", p->name, kind, j);
    ws_status rc = ws_tensor_empty(recv, WS_U8, 1, &rn, &opts);
    if (rc != WS_OK) ws_tensor_free(send);
    return rc;
}

/* The staging tensor the gather's pack writes bucket k into: the send side
 * or, on a rank with no one to gather with, the recv side (build_descs). */
static ws_tensor *pack_side(ws_plan *p, size_t k)
{
    return p->world == 1 ? &p->recv[k % 2] : &p->send[k % 2];
}

/* Frees the staging pairs, or (keep_pack) all but the sides the pack writes
 * (pack_side); staging_bytes then counts what is left. */
static void drop_staging(ws_plan *p, int keep_pack)
{
    for (int j = 0; j < p->pairs; j++) {
        if (!keep_pack || p->world > 1) ws_tensor_free(&p->recv[j]);
        if (!keep_pack || p->world == 1) ws_tensor_free(&p->send[j]);
    }
    p->stats.staging_bytes = keep_pack ? (size_t)p->pairs * p->staged_seg : 0;
    if (!keep_pack) p->pairs = 0;
}

/* Staging is sized by the fullest bucket, not the configured bucket, so a
 * small plan (an adapter) does not hold a large plan's staging memory. */
static ws_status ensure_staging(ws_plan *p, int pairs, size_t seg_bytes)
{
    /* Too small, or a direct plan kept only the pack's sides (drop_staging). */
    if (p->pairs > 0 && (p->staged_seg < seg_bytes || ws_tensor_is_released(&p->recv[0]) ||
                         ws_tensor_is_released(&p->send[0])))
        drop_staging(p, 0);
    if (p->pairs == 0) p->staged_seg = seg_bytes;
    for (int j = p->pairs; j < pairs; j++) {
        int64_t seg = (int64_t)p->staged_seg, all = seg * p->world;
        WS_TRY(new_pair(p, &p->send[j], &p->recv[j], seg, all, "", j));
        p->pairs = j + 1;
        p->stats.staging_bytes += (size_t)seg + (size_t)all;
    }
    return WS_OK;
}

static void release_slot(void *ctx) { (void)ctx; }

/* Server mode: every rank's gathered bucket lands in a sender's slot, so the
 * receive side of each staging pair is a view of that slot (the engine
 * process copies out of it); the send side exists only to gather from. */
static ws_status remote_staging(ws_plan *p, int pairs, size_t seg_bytes)
{
    drop_staging(p, 0);
    size_t all = seg_bytes * (size_t)p->world;
    if (all > p->slot_bytes)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': a bucket of %zu bytes (%d x %zu) does not fit the engine "
                      "process's shared-memory slot of %zu bytes; use a smaller bucket_mb or "
                      "larger slots",
                      p->name, all, p->world, seg_bytes, p->slot_bytes);
    p->staged_seg = seg_bytes;
    ws_tensor_opts opts = {.device = p->device};
    for (int j = 0; j < pairs; j++) {
        char nm[PLAN_NAME_CAP + 32];
        snprintf(nm, sizeof nm, "plan '%s' slot %d", p->name, j);
        ws_external mem = {.data = p->slot_base[j], .nbytes = p->slot_bytes, .device = p->device,
                           .source = "the engine's shared-memory slot", .release = release_slot};
        int64_t n = (int64_t)all;
        WS_TRY(ws_tensor_external(&p->recv[j], &mem, WS_U8, 1, &n, nm));
        if (p->world > 1) {
            int64_t seg = (int64_t)seg_bytes;
            snprintf(nm, sizeof nm, "plan '%s' send %d", p->name, j);
            opts.name = nm;
            ws_status rc = ws_tensor_empty(&p->send[j], WS_U8, 1, &seg, &opts);
            if (rc != WS_OK) {
                ws_tensor_free(&p->recv[j]);
                return rc;
            }
            p->stats.staging_bytes += seg_bytes;
        }
        p->pairs = j + 1;
    }
    return WS_OK;
}

/* Appends the copies of flat elements [lo, end) of an entry's full tensor,
 * read from `src` (element lo first), into its destination: all of them, or
 * their part in its block, row by row. */
static ws_status emit_out(vec *out, const plan_entry *e, int64_t lo, int64_t end, const char *src,
                          ws_dtype st)
{
    ws_dtype dt = e->dst.dtype;
    size_t ss = ws_dtype_size(st);
    const ws_plan_block *b = &e->block;
    if (b->cols == 0) return emit_copy(out, side_ptr(&e->dst, lo), dt, src, st, (size_t)(end - lo));
    int64_t C = b->cols, w = b->col_end - b->col_begin;
    if (w == 0 || b->row_end == b->row_begin) return WS_OK;
    if (b->col_begin == 0 && b->col_end == C) { /* whole rows: one range */
        int64_t x0 = lo > b->row_begin * C ? lo : b->row_begin * C;
        int64_t x1 = end < b->row_end * C ? end : b->row_end * C;
        if (x1 <= x0) return WS_OK;
        return emit_copy(out, side_ptr(&e->dst, x0 - b->row_begin * C), dt,
                         src + (size_t)(x0 - lo) * ss, st, (size_t)(x1 - x0));
    }
    int64_t i0 = lo / C, i1 = (end - 1) / C + 1;
    if (i0 < b->row_begin) i0 = b->row_begin;
    if (i1 > b->row_end) i1 = b->row_end;
    for (int64_t i = i0; i < i1; i++) {
        int64_t x0 = i * C + b->col_begin, x1 = i * C + b->col_end;
        if (x0 < lo) x0 = lo;
        if (x1 > end) x1 = end;
        if (x1 <= x0) continue;
        WS_TRY(emit_copy(out, side_ptr(&e->dst, (i - b->row_begin) * w + x0 - i * C - b->col_begin),
                         dt, src + (size_t)(x0 - lo) * ss, st, (size_t)(x1 - x0)));
    }
    return WS_OK;
}

/* Turns the pieces of each bucket into pack and unpack (or direct) copies. */
static ws_status build_descs(ws_plan *p, const plan_piece *pieces, plan_bucket *bk, size_t nb,
                             vec *pack, vec *out, vec *wire)
{
    for (size_t k = 0; k < nb; k++) {
        plan_bucket *b = &bk[k];
        b->pack_begin = pack->n;
        b->out_begin = out->n;
        b->wire_begin = wire->n;
        if (staged(p)) b->seg_used = align_up(b->seg_used, PLAN_ALIGN);
        void *send = NULL, *recv = NULL;
        if (staged(p)) {
            WS_TRY(ws_tensor_access(&p->recv[k % 2], WS_ACCESS_WRITE, "recv", &recv));
            /* A sender with no one to gather with packs straight into its
             * segment (server mode: into the slot; it has no send side). */
            if (p->world == 1)
                send = recv;
            else
                WS_TRY(ws_tensor_access(&p->send[k % 2], WS_ACCESS_WRITE, "send", &send));
        }
        for (size_t i = b->piece_begin; i < b->piece_end; i++) {
            const plan_piece *pc = &pieces[i];
            const plan_entry *e = &p->entries[pc->entry];
            ws_dtype dt = e->dst.dtype, st = e->src.dtype;
            if (!staged(p)) {
                WS_TRY(emit_out(out, e, pc->a, pc->b, side_ptr(&e->src, pc->a), st));
                continue;
            }
            /* Pack only this rank's real elements; the padding of the last
             * shards is never read back. */
            int64_t valid = e->numel - (int64_t)p->rank * e->shard;
            int64_t hi = pc->b < valid ? pc->b : valid;
            if (hi > pc->a && p->role != WS_PLAN_RECEIVER)
                WS_TRY(emit_copy(pack, (char *)send + pc->off, dt, side_ptr(&e->src, pc->a), st,
                                 (size_t)(hi - pc->a)));
            /* Server mode: every rank's part of the piece, as the engine
             * process reads it out of the slot. */
            for (int r = 0; r < p->world && p->role == WS_PLAN_REMOTE; r++) {
                int64_t lo = r * e->shard + pc->a, end = r * e->shard + pc->b;
                if (end > e->numel) end = e->numel;
                if (end <= lo) continue;
                ws_wire_piece w = {e->target, (uint64_t)(e->target_offset + lo),
                                   (uint64_t)(end - lo), (size_t)r * b->seg_used + pc->off};
                WS_TRY(vec_push(wire, &w, sizeof w));
                p->wire_bytes += (size_t)(end - lo) * ws_dtype_size(dt);
            }
            for (int r = 0; r < p->world && p->role != WS_PLAN_SENDER &&
                            p->role != WS_PLAN_REMOTE;
                 r++) {
                int64_t lo = r * e->shard + pc->a, end = r * e->shard + pc->b;
                if (end > e->numel) end = e->numel;
                if (end <= lo) continue;
                WS_TRY(emit_out(out, e, lo, end, (char *)recv + (size_t)r * b->seg_used + pc->off,
                                dt));
            }
        }
        b->pack_end = pack->n;
        b->out_end = out->n;
        b->wire_end = wire->n;
    }
    return WS_OK;
}

static void drop_exchange(ws_plan *p);

static void drop_plan(ws_plan *p)
{
    drop_exchange(p);
    free(p->buckets);
    free(p->pack);
    free(p->out);
    free(p->wire);
    p->buckets = NULL;
    p->pack = p->out = NULL;
    p->wire = NULL;
    p->n_buckets = p->n_pack = p->n_out = p->n_wire = p->wire_bytes = 0;
    p->planned = 0;
}

static ws_status plan_buckets(ws_plan *p)
{
    vec pieces = {0}, buckets = {0}, pack = {0}, out = {0}, wire = {0};
    drop_plan(p);
    ws_status rc = staged(p) ? lay_out(p, p->seg_bytes, PLAN_ALIGN, &pieces, &buckets)
                             : lay_out(p, p->bucket_bytes, 1, &pieces, &buckets);
    if (rc == WS_OK && staged(p)) {
        /* Each rank's segment starts on PLAN_ALIGN. Server mode with one
         * rank has one segment, in a slot, whose end needs no rounding: a
         * bucket of any size fits a slot of that size (bucket_mb as given). */
        size_t seg = 0, round = p->world == 1 && p->role == WS_PLAN_REMOTE ? 1 : PLAN_ALIGN;
        const plan_bucket *bk = buckets.data;
        for (size_t k = 0; k < buckets.n; k++)
            if (align_up(bk[k].seg_used, round) > seg) seg = align_up(bk[k].seg_used, round);
        int pairs = buckets.n > 1 ? 2 : buckets.n ? 1 : 0;
        rc = p->role == WS_PLAN_REMOTE ? remote_staging(p, pairs, seg)
                                       : ensure_staging(p, pairs, seg);
    }
    if (rc == WS_OK)
        rc = build_descs(p, pieces.data, buckets.data, buckets.n, &pack, &out, &wire);
    free(pieces.data);
    if (rc != WS_OK) {
        free(buckets.data);
        free(pack.data);
        free(out.data);
        free(wire.data);
        ws_errprefix("plan '%s': planning %zu entries", p->name, p->n_entries);
        return rc;
    }
    p->buckets = buckets.data;
    p->n_buckets = buckets.n;
    p->pack = pack.data;
    p->n_pack = pack.n;
    p->out = out.data;
    p->n_out = out.n;
    p->wire = wire.data;
    p->n_wire = wire.n;
    p->planned = 1;
    size_t gathered = 0, relayed = 0;
    for (size_t k = 0; k < p->n_buckets; k++) {
        size_t all = p->buckets[k].seg_used * (size_t)p->world;
        if (p->world > 1 && p->role != WS_PLAN_RECEIVER) gathered += all;
        if (p->relay) relayed += all;
    }
    relayed += p->wire_bytes;
    p->stats.buckets = p->n_buckets;
    p->stats.bytes_gathered = gathered;
    p->stats.bytes_gathered_full = gathered;
    p->stats.bytes_relayed = relayed;
    return WS_OK;
}

ws_status ws_plan_estimate(ws_plan *p, ws_plan_stats *out)
{
    vec pieces = {0}, buckets = {0};
    ws_status rc = staged(p) ? lay_out(p, p->seg_bytes, PLAN_ALIGN, &pieces, &buckets)
                             : lay_out(p, p->bucket_bytes, 1, &pieces, &buckets);
    if (rc != WS_OK) {
        free(pieces.data);
        free(buckets.data);
        ws_errprefix("plan '%s': estimating %zu entries", p->name, p->n_entries);
        return rc;
    }
    ws_plan_get_stats(p, out);
    size_t seg = 0, gathered = 0, relayed = 0;
    const plan_bucket *bk = buckets.data;
    for (size_t k = 0; k < buckets.n && staged(p); k++) {
        size_t used = align_up(bk[k].seg_used, PLAN_ALIGN);
        if (used > seg) seg = used;
        if (p->world > 1 && p->role != WS_PLAN_RECEIVER) gathered += used * (size_t)p->world;
        if (p->relay) relayed += used * (size_t)p->world;
    }
    /* What ensure_staging would hold: one or two send/recv pairs. */
    size_t pairs = buckets.n > 1 ? 2 : buckets.n;
    out->buckets = buckets.n;
    out->bytes_gathered = gathered;
    out->bytes_gathered_full = gathered;
    out->bytes_relayed = relayed;
    out->staging_bytes = staged(p) ? pairs * (seg + seg * (size_t)p->world) : 0;
    /* The exchange's and the direct paths' own figures need every rank's
     * blocks and comm: known once planned. */
    if (p->planned && (p->x_on || p->x_direct)) {
        out->exchanged = p->stats.exchanged;
        out->direct = p->stats.direct;
        out->bytes_gathered = p->stats.bytes_gathered;
        out->bytes_gathered_full = p->stats.bytes_gathered_full;
        out->bytes_relayed = p->stats.bytes_relayed;
        out->staging_bytes = p->stats.staging_bytes;
    }
    free(pieces.data);
    free(buckets.data);
    return WS_OK;
}

/* ---- execution ------------------------------------------------------------------- */

/* Every source readable, every destination writable (a sleeping pool has no
 * memory behind its addresses); records their data pointers for planning. */
static ws_status check_ready(ws_plan *p)
{
    for (size_t i = 0; i < p->n_entries; i++) {
        plan_entry *e = &p->entries[i];
        ws_tensor v;
        void *ptr;
        ws_status rc = WS_OK;
        if (e->src.storage) {
            side_view(p, &e->src, e->src_numel, &v);
            rc = ws_tensor_access(&v, WS_ACCESS_READ, "src", &ptr);
            if (rc != WS_OK) {
                ws_errprefix("plan '%s': entry %zu", p->name, i + 1);
                return rc;
            }
            e->src.base = ptr;
        }
        if (!e->dst.storage) continue;
        side_view(p, &e->dst, e->dst_numel, &v);
        rc = ws_tensor_access(&v, WS_ACCESS_WRITE, "dst", &ptr);
        e->dst.base = ptr;
        if (rc != WS_OK) {
            ws_errprefix("plan '%s': entry %zu", p->name, i + 1);
            return rc;
        }
    }
    return WS_OK;
}

/* Fingerprint of every entry's numel, wire dtype and shard: equal entry and
 * bucket counts can hide entries that differ in size, dtype or sharding,
 * which would gather bytes into the wrong destinations (or leave direct
 * messages that no peer matches). Kept positive (it is negated for the
 * min). */
static int64_t layout_of(const ws_plan *p)
{
    uint64_t h = 14695981039346656037u; /* FNV-1a */
    for (size_t i = 0; i < p->n_entries; i++) {
        const uint64_t words[3] = {(uint64_t)p->entries[i].numel, (uint64_t)p->entries[i].dst.dtype,
                                   (uint64_t)p->entries[i].shard};
        for (int w = 0; w < 3; w++)
            for (int b = 0; b < 64; b += 8) h = (h ^ ((words[w] >> b) & 0xff)) * 1099511628211u;
    }
    return (int64_t)(h >> 2);
}

/* All ranks learn whether every rank is ready and has the same plan shape,
 * so a local failure ends the sync everywhere instead of hanging a gather.
 * One round trip of the comm's host backend: max of v and of -v. Also
 * whether every rank has peers (ws_plan_set_peers) or none: *peers_differ
 * is sticky, carried in and out, so agreements in a row spread it. */
static ws_status agree_over(ws_plan *p, ws_comm *comm, ws_status local, int *peers_differ)
{
    int64_t k = (int64_t)p->n_buckets, n = (int64_t)p->n_entries, fp = layout_of(p);
    int64_t pe = p->peers != NULL;
    int64_t g[10] = {local != WS_OK, k, -k, n, -n, fp, -fp, pe, -pe, *peers_differ};
    WS_TRY(ws_comm_max_i64(comm, g, 10));
    if (g[7] != -g[8] || g[9]) {
        *peers_differ = 1;
        if (local == WS_OK)
            return WS_ERR(WS_ERR_ARG, "plan '%s': some ranks' plans have peers and some do "
                          "not; give every trainer and engine rank's plan the same peers", p->name);
    }
    if (local != WS_OK) return local;
    if (g[0] > 0)
        return WS_ERR(WS_ERR_COMM,
                      "plan '%s': another rank could not start the sync (see its message); "
                      "nothing was transferred",
                      p->name);
    if (g[1] != k || -g[2] != k || g[3] != n || -g[4] != n)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': ranks disagree on the plan shape (this rank: %lld entries, "
                      "%lld buckets; others: %lld..%lld entries, %lld..%lld buckets); every rank "
                      "must add the same entries with the same bucket size",
                      p->name, (long long)n, (long long)k, (long long)-g[4], (long long)g[3],
                      (long long)-g[2], (long long)g[1]);
    if (g[5] != fp || -g[6] != fp)
        return WS_ERR(WS_ERR_ARG,
                      "plan '%s': ranks disagree on the sizes, shards or dtypes of the entries "
                      "(all have %lld entries, but split differently); every rank must add the "
                      "same entries in the same order",
                      p->name, (long long)n);
    return WS_OK;
}

/* Over the gather's comm; for a relay, the trainer ranks' comm, then the
 * relay (its sender and the engine ranks), then the trainer ranks' comm
 * again, so what any rank finds reaches every other before a byte moves,
 * whether the peers differ included. Then, with peers (every rank has them,
 * which every rank now knows alike), once more over every rank. */
static ws_status agree(ws_plan *p, ws_status local)
{
    ws_status rc = local;
    int differ = 0;
    if (p->comm) rc = agree_over(p, p->comm, rc, &differ);
    if (p->relay) rc = agree_over(p, p->relay, rc, &differ);
    if (p->comm && p->role == WS_PLAN_SENDER) rc = agree_over(p, p->comm, rc, &differ);
    if (p->peers && !differ) rc = agree_over(p, p->peers, rc, &differ);
    return rc;
}

static void mark_entries(const ws_plan *p, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++) {
        if (!p->entries[i].dst.storage) continue;
        ws_tensor v;
        side_view(p, &p->entries[i].dst, p->entries[i].dst_numel, &v);
        ws_tensor_mark_written(&v);
    }
}

static ws_status copy_range(ws_plan *p, const ws_copy_desc *d, size_t begin, size_t end,
                            const char *what, size_t k)
{
    if (end == begin) return WS_OK;
    ws_status rc = p->device->ops->copy_batch(p->device, d + begin, end - begin);
    if (rc != WS_OK)
        ws_errprefix("plan '%s': %s of bucket %zu of %zu", p->name, what, k + 1, p->n_buckets);
    return rc;
}

static ws_status start_exchange(ws_plan *p, size_t k, ws_comm_request **req);

static ws_status start_gather(ws_plan *p, size_t k, ws_comm_request **req)
{
    if (p->x_on) return start_exchange(p, k, req);
    const plan_bucket *b = &p->buckets[k];
    ws_tensor send = {0}, recv = {0};
    ws_status rc = ws_tensor_narrow(&send, &p->send[k % 2], 0, 0, (int64_t)b->seg_used);
    if (rc == WS_OK)
        rc = ws_tensor_narrow(&recv, &p->recv[k % 2], 0, 0, (int64_t)(b->seg_used * (size_t)p->world));
    if (rc == WS_OK) rc = ws_comm_all_gather(p->comm, &send, &recv, req);
    ws_tensor_free(&send);
    ws_tensor_free(&recv);
    if (rc != WS_OK)
        ws_errprefix("plan '%s': all_gather of bucket %zu of %zu", p->name, k + 1, p->n_buckets);
    return rc;
}

static ws_status stopped(ws_plan *p, size_t k, size_t K, size_t done)
{
    return WS_ERR(WS_ERR_INTERRUPTED,
                  "plan '%s': stopped by the progress callback after bucket %zu of %zu (%zu of "
                  "%zu bytes written)",
                  p->name, k + 1, K, done, p->bytes_total);
}

/* The second half of a double-buffered bucket k: waits for its collective
 * (req[k % 2]; `what` names it in errors), copies the bucket out, marks the
 * entries it completes and reports progress. */
static ws_status land_bucket(ws_plan *p, size_t k, ws_comm_request **req, const char *what,
                             size_t *marked, ws_plan_progress_fn progress, void *ctx)
{
    const plan_bucket *b = &p->buckets[k];
    size_t K = p->n_buckets;
    double t = now_ms();
    ws_comm_request *r = req[k % 2];
    req[k % 2] = NULL;
    ws_status rc = ws_comm_wait(r);
    p->stats.gather_ms += now_ms() - t;
    if (rc != WS_OK) {
        ws_errprefix("plan '%s': %s of bucket %zu of %zu", p->name, what, k + 1, K);
        return rc;
    }
    t = now_ms();
    rc = copy_range(p, p->out, b->out_begin, b->out_end, "copy-out", k);
    p->stats.copy_out_ms += now_ms() - t;
    if (rc != WS_OK) return rc;
    mark_entries(p, *marked, b->entries_done);
    *marked = b->entries_done;
    if (progress && progress(ctx, k + 1, K, b->bytes_done, p->bytes_total))
        return stopped(p, k, K, b->bytes_done);
    return WS_OK;
}

/* Never leaves a collective running on buffers the caller may free; keeps
 * the first error's message, which says what went wrong. */
static ws_status drain(ws_plan *p, ws_comm_request **req, ws_status rc, size_t marked)
{
    if (req[0] || req[1]) {
        char first[512];
        snprintf(first, sizeof first, "%s", ws_errmsg());
        for (int j = 0; j < 2; j++)
            if (req[j]) (void)ws_comm_wait(req[j]);
        WS_ERR(rc, "%s", first);
    }
    if (rc == WS_OK) mark_entries(p, marked, p->n_entries);
    return rc;
}

static ws_status run_gathered(ws_plan *p, ws_plan_progress_fn progress, void *ctx)
{
    ws_comm_request *req[2] = {NULL, NULL};
    size_t K = p->n_buckets, marked = 0;
    ws_status rc = WS_OK;
    double t;
    if (K) {
        t = now_ms();
        rc = copy_range(p, p->pack, p->buckets[0].pack_begin, p->buckets[0].pack_end, "pack", 0);
        p->stats.pack_ms += now_ms() - t;
        if (rc == WS_OK) rc = start_gather(p, 0, &req[0]);
    }
    for (size_t k = 0; k < K && rc == WS_OK; k++) {
        if (k + 1 < K) {
            /* The pair of bucket k+1 was last used by bucket k-1, whose gather
             * and copy-out are done: start the next gather before copying out. */
            t = now_ms();
            rc = copy_range(p, p->pack, p->buckets[k + 1].pack_begin, p->buckets[k + 1].pack_end,
                            "pack", k + 1);
            p->stats.pack_ms += now_ms() - t;
            if (rc == WS_OK) rc = start_gather(p, k + 1, &req[(k + 1) % 2]);
            if (rc != WS_OK) break;
        }
        rc = land_bucket(p, k, req,
                         p->x_direct ? "transfer" : p->x_on ? "all_to_all" : "all_gather",
                         &marked, progress, ctx);
    }
    return drain(p, req, rc, marked);
}

/* The gathered bucket k (pair k % 2) as one tensor: the relay's payload. */
static ws_status start_relay(ws_plan *p, size_t k, ws_comm_request **req)
{
    const plan_bucket *b = &p->buckets[k];
    if (p->x_direct) {
        ws_status rc = ws_comm_transfer(p->x_comm, p->device, p->msgs + b->msg_begin,
                                        b->msg_end - b->msg_begin, req);
        if (rc != WS_OK)
            ws_errprefix("plan '%s': relay of bucket %zu of %zu to the engine ranks", p->name,
                         k + 1, p->n_buckets);
        return rc;
    }
    ws_tensor all = {0};
    ws_status rc = ws_tensor_narrow(&all, &p->recv[k % 2], 0, 0,
                                    (int64_t)(b->seg_used * (size_t)p->world));
    if (rc == WS_OK) rc = ws_comm_broadcast(p->relay, &all, 0, req);
    ws_tensor_free(&all);
    if (rc != WS_OK)
        ws_errprefix("plan '%s': relay of bucket %zu of %zu to the engine ranks", p->name, k + 1,
                     p->n_buckets);
    return rc;
}


/* A relay's sender: pack, gather over the trainer ranks, then (the first
 * trainer rank) broadcast to the engine ranks; the broadcast of bucket k
 * runs while bucket k+1 is packed and gathered, in the other pair. */
static ws_status run_sender(ws_plan *p, ws_plan_progress_fn progress, void *ctx)
{
    ws_comm_request *req[2] = {NULL, NULL};
    size_t K = p->n_buckets;
    ws_status rc = WS_OK;
    for (size_t k = 0; k < K && rc == WS_OK; k++) {
        const plan_bucket *b = &p->buckets[k];
        int j = (int)(k % 2);
        double t = now_ms();
        if (req[j]) { /* bucket k-2 left this pair */
            ws_comm_request *r = req[j];
            req[j] = NULL;
            rc = ws_comm_wait(r);
            if (rc != WS_OK) {
                ws_errprefix("plan '%s': relay of bucket %zu of %zu", p->name, k - 1, K);
                break;
            }
        }
        p->stats.gather_ms += now_ms() - t;
        t = now_ms();
        rc = copy_range(p, p->pack, b->pack_begin, b->pack_end, "pack", k);
        p->stats.pack_ms += now_ms() - t;
        if (rc != WS_OK) break;
        t = now_ms();
        if (p->world > 1) {
            ws_comm_request *g = NULL;
            rc = start_gather(p, k, &g);
            if (rc == WS_OK) rc = ws_comm_wait(g);
            if (rc != WS_OK) {
                ws_errprefix("plan '%s': all_gather of bucket %zu of %zu", p->name, k + 1, K);
                break;
            }
        }
        if (p->relay) rc = start_relay(p, k, &req[j]);
        p->stats.gather_ms += now_ms() - t;
        if (rc == WS_OK && progress && progress(ctx, k + 1, K, b->bytes_done, p->bytes_total))
            rc = stopped(p, k, K, b->bytes_done);
    }
    char first[512];
    snprintf(first, sizeof first, "%s", rc == WS_OK ? "" : ws_errmsg());
    for (int j = 0; j < 2; j++) {
        if (!req[j]) continue;
        ws_status w = ws_comm_wait(req[j]);
        if (rc == WS_OK && w != WS_OK) {
            ws_errprefix("plan '%s': relay to the engine ranks", p->name);
            rc = w;
        }
    }
    if (first[0]) WS_ERR(rc, "%s", first);
    return rc;
}

/* A relay's receiver: each bucket arrives by broadcast into one pair while
 * the previous one is copied out of the other; or, direct, as messages
 * straight into the destinations, two buckets in flight. A trainer rank
 * sending its shards itself (x_shards) runs the same loop. */
/* Packs bucket k where the relay has packing to do (a trainer rank sending
 * its converted shard), then starts its relay. */
static ws_status pack_relay(ws_plan *p, size_t k, ws_comm_request **req)
{
    double t = now_ms();
    ws_status rc = copy_range(p, p->pack, p->buckets[k].pack_begin, p->buckets[k].pack_end,
                              "pack", k);
    p->stats.pack_ms += now_ms() - t;
    return rc == WS_OK ? start_relay(p, k, req) : rc;
}

static ws_status run_receiver(ws_plan *p, ws_plan_progress_fn progress, void *ctx)
{
    ws_comm_request *req[2] = {NULL, NULL};
    size_t K = p->n_buckets, marked = 0;
    ws_status rc = K ? pack_relay(p, 0, &req[0]) : WS_OK;
    for (size_t k = 0; k < K && rc == WS_OK; k++) {
        if (k + 1 < K) {
            rc = pack_relay(p, k + 1, &req[(k + 1) % 2]);
            if (rc != WS_OK) break;
        }
        rc = land_bucket(p, k, req, "relay", &marked, progress, ctx);
    }
    return drain(p, req, rc, marked);
}

/* Server mode: the slots' mappings. They stay put for a connection; a plan
 * first executed (or executed again after a new connection) plans with them,
 * since its descriptors hold their addresses. Both slots are free between
 * syncs, so asking does not wait. */
static ws_status remote_slots(ws_plan *p)
{
    for (int j = 0; j < 2; j++) {
        void *base = NULL;
        size_t bytes = 0;
        ws_status rc = ws_sender_slot(p->sender, j, &base, &bytes);
        if (rc != WS_OK) {
            ws_errprefix("plan '%s': the engine process's slot %d", p->name, j);
            return rc;
        }
        if (base != p->slot_base[j] || bytes != p->slot_bytes) p->planned = 0;
        p->slot_base[j] = base;
        p->slot_bytes = bytes;
    }
    return WS_OK;
}

/* Server mode: per bucket, wait until its slot's previous bucket was copied
 * out by the engine process, pack (and gather) into the slot, hand it over;
 * the engine copies bucket k out while bucket k+1 is packed. The last
 * acknowledgements are the finish's to wait for. */
static ws_status run_remote(ws_plan *p, ws_plan_progress_fn progress, void *ctx)
{
    size_t K = p->n_buckets;
    for (size_t k = 0; k < K; k++) {
        const plan_bucket *b = &p->buckets[k];
        int j = (int)(k % 2);
        double t = now_ms();
        void *base = NULL;
        size_t bytes = 0;
        ws_status rc = ws_sender_slot(p->sender, j, &base, &bytes);
        p->stats.copy_out_ms += now_ms() - t;
        if (rc == WS_OK && base != p->slot_base[j])
            rc = WS_ERR(WS_ERR_COMM, "the engine process's slot %d moved during the sync", j);
        if (rc != WS_OK) {
            ws_errprefix("plan '%s': bucket %zu of %zu", p->name, k + 1, K);
            return rc;
        }
        t = now_ms();
        rc = copy_range(p, p->pack, b->pack_begin, b->pack_end, "pack", k);
        p->stats.pack_ms += now_ms() - t;
        if (rc != WS_OK) return rc;
        t = now_ms();
        if (p->world > 1) {
            ws_comm_request *g = NULL;
            rc = start_gather(p, k, &g);
            if (rc == WS_OK) rc = ws_comm_wait(g);
            if (rc != WS_OK) {
                ws_errprefix("plan '%s': all_gather of bucket %zu of %zu", p->name, k + 1, K);
                return rc;
            }
        }
        /* The engine process reads the slot as soon as it hears of it: the
         * device's queued copies into it must be done. */
        if (p->device->kind != WS_DEVICE_CPU) rc = ws_device_synchronize(p->device);
        p->stats.gather_ms += now_ms() - t;
        if (rc == WS_OK)
            rc = ws_sender_submit(p->sender, j, p->wire + b->wire_begin,
                                  b->wire_end - b->wire_begin);
        if (rc != WS_OK) {
            ws_errprefix("plan '%s': bucket %zu of %zu", p->name, k + 1, K);
            return rc;
        }
        if (progress && progress(ctx, k + 1, K, b->bytes_done, p->bytes_total))
            return stopped(p, k, K, b->bytes_done);
    }
    return WS_OK;
}

static ws_status run_direct(ws_plan *p, ws_plan_progress_fn progress, void *ctx)
{
    size_t K = p->n_buckets, marked = 0;
    for (size_t k = 0; k < K; k++) {
        const plan_bucket *b = &p->buckets[k];
        double t = now_ms();
        ws_status rc = copy_range(p, p->out, b->out_begin, b->out_end, "copy", k);
        p->stats.copy_out_ms += now_ms() - t;
        if (rc != WS_OK) return rc;
        mark_entries(p, marked, b->entries_done);
        marked = b->entries_done;
        if (progress && progress(ctx, k + 1, K, b->bytes_done, p->bytes_total))
            return WS_ERR(WS_ERR_INTERRUPTED,
                          "plan '%s': stopped by the progress callback after bucket %zu of %zu "
                          "(%zu of %zu bytes written)",
                          p->name, k + 1, K, b->bytes_done, p->bytes_total);
    }
    mark_entries(p, marked, p->n_entries);
    return WS_OK;
}

static int wants_exchange(const ws_plan *p);
static ws_status plan_exchange(ws_plan *p);
static ws_status plan_relay(ws_plan *p);

ws_status ws_plan_execute(ws_plan *p, ws_plan_progress_fn progress, void *ctx)
{
    double t0 = now_ms();
    p->stats.pack_ms = p->stats.gather_ms = p->stats.copy_out_ms = p->stats.total_ms = 0;
    ws_status rc = check_ready(p);
    if (rc == WS_OK && p->role == WS_PLAN_REMOTE) rc = remote_slots(p);
    if (rc == WS_OK && !p->planned) rc = plan_buckets(p);
    if (p->comm || p->relay || p->peers) rc = agree(p, rc);
    if (rc == WS_OK && wants_exchange(p)) rc = plan_exchange(p);
    if (rc == WS_OK && (p->relay || p->peers) && !p->x_planned) rc = plan_relay(p);
    char holder[PLAN_NAME_CAP + 32];
    snprintf(holder, sizeof holder, "plan '%s' (executing)", p->name);
    for (size_t i = 0; i < p->n_pools; i++) ws_pool_hold(p->pools[i], holder);
    if (rc == WS_OK)
        rc = p->role == WS_PLAN_RECEIVER || p->x_shards ? run_receiver(p, progress, ctx)
             : p->role == WS_PLAN_SENDER                 ? run_sender(p, progress, ctx)
             : p->role == WS_PLAN_REMOTE                 ? run_remote(p, progress, ctx)
             : p->world > 1                              ? run_gathered(p, progress, ctx)
                                                         : run_direct(p, progress, ctx);
    /* Device-side copies may still be queued; the stats and the caller's
     * next read both need them finished, and the pools stay held until then. */
    ws_status sync = ws_device_synchronize(p->device);
    for (size_t i = 0; i < p->n_pools; i++) ws_pool_unhold(p->pools[i]);
    if (rc == WS_OK && sync != WS_OK) {
        ws_errprefix("plan '%s': finishing the sync", p->name);
        rc = sync;
    }
    p->stats.total_ms = now_ms() - t0;
    return rc;
}

void ws_plan_get_stats(const ws_plan *p, ws_plan_stats *out) { *out = p->stats; }

void ws_plan_destroy(ws_plan *p)
{
    if (!p) return;
    for (size_t i = 0; i < p->n_entries; i++) {
        if (p->entries[i].src.storage) ws_storage_release(p->entries[i].src.storage);
        if (p->entries[i].dst.storage) ws_storage_release(p->entries[i].dst.storage);
    }
    drop_staging(p, 0);
    drop_plan(p);
    free(p->pools);
    free(p->entries);
    free(p->names);
    free(p);
}

/* ---- the exchange ----------------------------------------------------------------- */

/* A run of a block's packed bytes starts on this boundary within a peer's
 * part of an exchange, so converting copies read and write aligned. */
#define X_ALIGN 16

ws_status ws_plan_set_exchange(ws_plan *p, ws_plan_exchange how)
{
    if (how != WS_PLAN_EXCHANGE_AUTO && how != WS_PLAN_EXCHANGE_GATHER &&
        how != WS_PLAN_EXCHANGE_STAGED)
        return WS_ERR(WS_ERR_ARG, "plan '%s': exchange %d is not auto, gather or staged",
                      p->name, (int)how);
    if (how != p->exchange) p->planned = 0;
    p->exchange = how;
    return WS_OK;
}

static void drop_exchange(ws_plan *p)
{
    free(p->x_counts);
    p->x_counts = NULL;
    for (int j = 0; j < p->x_pairs; j++) {
        ws_tensor_free(&p->x_send[j]);
        ws_tensor_free(&p->x_recv[j]);
    }
    p->x_pairs = 0;
    p->x_planned = p->x_on = p->x_direct = p->x_shards = 0;
    p->x_comm = NULL;
    free(p->msgs);
    free(p->runs);
    p->msgs = NULL;
    p->runs = NULL;
    p->n_msgs = 0;
    p->stats.exchanged = p->stats.direct = 0;
}

/* Only a colocated plan gathering over several ranks, once per planning. */
static int wants_exchange(const ws_plan *p)
{
    return !p->x_planned && p->exchange != WS_PLAN_EXCHANGE_GATHER &&
           p->role == WS_PLAN_COLOCATED && p->world > 1;
}

/* The runs of flat elements [lo, hi) that lie in block b, in flat order:
 * x (first element), n (count), at (its index in the block's packed
 * order). A block of whole rows, or none, gives at most one run; a range of
 * columns one per row. */
typedef struct run_iter {
    const ws_plan_block *b;
    int64_t lo, hi, row, row_end;
    int done;
} run_iter;

static void runs_begin(run_iter *it, const ws_plan_block *b, int64_t lo, int64_t hi)
{
    memset(it, 0, sizeof *it);
    it->b = b;
    it->lo = lo;
    it->hi = hi;
    it->done = hi <= lo;
    if (it->done || b->cols == 0) return;
    int64_t C = b->cols;
    it->row = lo / C > b->row_begin ? lo / C : b->row_begin;
    it->row_end = (hi - 1) / C + 1 < b->row_end ? (hi - 1) / C + 1 : b->row_end;
    it->done = b->col_end == b->col_begin || it->row >= it->row_end;
}

static int runs_next(run_iter *it, int64_t *x, int64_t *n, int64_t *at)
{
    const ws_plan_block *b = it->b;
    if (it->done) return 0;
    if (b->cols == 0) { /* the whole tensor */
        *x = it->lo, *n = it->hi - it->lo, *at = it->lo;
        it->done = 1;
        return 1;
    }
    int64_t C = b->cols, w = b->col_end - b->col_begin;
    if (b->col_begin == 0 && b->col_end == C) { /* whole rows: one range */
        int64_t x0 = it->lo > b->row_begin * C ? it->lo : b->row_begin * C;
        int64_t x1 = it->hi < b->row_end * C ? it->hi : b->row_end * C;
        it->done = 1;
        if (x1 <= x0) return 0;
        *x = x0, *n = x1 - x0, *at = x0 - b->row_begin * C;
        return 1;
    }
    while (it->row < it->row_end) {
        int64_t i = it->row++;
        int64_t x0 = i * C + b->col_begin, x1 = i * C + b->col_end;
        if (x0 < it->lo) x0 = it->lo;
        if (x1 > it->hi) x1 = it->hi;
        if (x1 <= x0) continue;
        *x = x0, *n = x1 - x0, *at = (i - b->row_begin) * w + x0 - i * C - b->col_begin;
        return 1;
    }
    it->done = 1;
    return 0;
}

/* Appends dst <- src, extending the last copy (from index `floor` on) when
 * this one continues it: a column block's rows land one after another. */
static ws_status emit_joined(vec *v, size_t floor, void *dst, ws_dtype dt, const void *src,
                             ws_dtype st, size_t count)
{
    if (v->n > floor) {
        ws_copy_desc *l = (ws_copy_desc *)v->data + v->n - 1;
        size_t ds = ws_dtype_size(dt), ss = ws_dtype_size(st), es = ds > ss ? ds : ss;
        if (l->dst_dtype == dt && l->src_dtype == st &&
            (char *)l->dst + l->count * ds == (char *)dst &&
            (const char *)l->src + l->count * ss == (const char *)src &&
            (l->count + count) * es <= PLAN_CHUNK_BYTES) {
            l->count += count;
            return WS_OK;
        }
    }
    return emit_copy(v, dst, dt, src, st, count);
}

/* Flat elements of rank r's real shard slice [a, b): [lo, hi). */
static void shard_span(const plan_entry *e, int r, int64_t a, int64_t b, int64_t *lo, int64_t *hi)
{
    int64_t valid = e->numel - (int64_t)r * e->shard;
    valid = valid < 0 ? 0 : valid > e->shard ? e->shard : valid;
    *lo = (int64_t)r * e->shard + a;
    *hi = (int64_t)r * e->shard + (b < valid ? b : valid);
}

/* The bytes a part of an exchange carries for pieces [from, to) of bucket k:
 * for this rank's send to `peer` (send = 1: this rank's shard, the peer's
 * blocks) or its recv from `peer` (the peer's shard, this rank's blocks).
 * With `v`, also appends the pack (send) or copy-out (recv) copies, the
 * part starting at `buf`; buf NULL with peer = this rank: copies straight
 * from its shard into its blocks, which never cross the staging. */
static ws_status x_part(const ws_plan *p, const plan_piece *pieces, size_t from, size_t to,
                        const ws_plan_block *blocks, int peer, int send, vec *v, size_t floor,
                        char *buf, size_t *bytes)
{
    size_t cur = 0;
    int owner = send ? p->rank : peer, holder = send ? peer : p->rank;
    for (size_t i = from; i < to; i++) {
        const plan_piece *pc = &pieces[i];
        const plan_entry *e = &p->entries[pc->entry];
        const ws_plan_block *b = &blocks[(size_t)holder * p->n_entries + pc->entry];
        int64_t lo, hi;
        shard_span(e, owner, pc->a, pc->b, &lo, &hi);
        if (hi <= lo) continue;
        int64_t cnt = elems_below(b, hi) - elems_below(b, lo);
        if (cnt <= 0) continue;
        ws_dtype dt = e->dst.dtype;
        size_t es = ws_dtype_size(dt);
        cur = align_up(cur, X_ALIGN);
        if (v) {
            run_iter it;
            int64_t x, n, at;
            size_t run = cur;
            runs_begin(&it, b, lo, hi);
            while (runs_next(&it, &x, &n, &at)) {
                if (send)
                    WS_TRY(emit_joined(v, floor, buf + run, dt,
                                       side_ptr(&e->src, x - (int64_t)p->rank * e->shard),
                                       e->src.dtype, (size_t)n));
                else if (!buf)
                    WS_TRY(emit_joined(v, floor, side_ptr(&e->dst, at), dt,
                                       side_ptr(&e->src, x - (int64_t)p->rank * e->shard),
                                       e->src.dtype, (size_t)n));
                else
                    WS_TRY(emit_joined(v, floor, side_ptr(&e->dst, at), dt, buf + run, dt,
                                       (size_t)n));
                run += (size_t)n * es;
            }
        }
        cur += (size_t)cnt * es;
    }
    *bytes = cur;
    return WS_OK;
}

/* Counts and displacements of every bucket (p->x_counts), and the largest
 * send and recv totals of a bucket. A rank's part for itself is copied
 * directly (count 0) but still counted in `received`: it is what its
 * blocks take from its own shard, as a gather's own piece is. */
static ws_status x_count(ws_plan *p, const plan_piece *pieces, const plan_bucket *bk,
                         const ws_plan_block *blocks, size_t *send_max, size_t *recv_max,
                         size_t *received)
{
    size_t W = (size_t)p->world;
    p->x_counts = ws_calloc(p->n_buckets * 4 * W + 1, sizeof *p->x_counts);
    if (!p->x_counts) return WS_ERR(WS_ERR_NOMEM, "out of host memory for exchange counts");
    *send_max = *recv_max = *received = 0;
    for (size_t k = 0; k < p->n_buckets; k++) {
        size_t *c = p->x_counts + k * 4 * W;
        for (int side = 0; side < 2; side++) { /* 0: send, 1: recv */
            size_t *counts = c + 2 * W * (size_t)side, *displs = counts + W, off = 0;
            for (int q = 0; q < p->world; q++) {
                off = align_up(off, PLAN_ALIGN);
                displs[q] = off;
                WS_TRY(x_part(p, pieces, bk[k].piece_begin, bk[k].piece_end, blocks, q,
                              side == 0, NULL, 0, NULL, &counts[q]));
                if (side == 1) *received += counts[q];
                if (q == p->rank) counts[q] = 0;
                off += counts[q];
            }
            size_t *mx = side == 0 ? send_max : recv_max;
            if (off > *mx) *mx = off;
        }
    }
    return WS_OK;
}

/* The pack and copy-out copies of every bucket, into the exchange staging. */
static ws_status x_descs(ws_plan *p, const plan_piece *pieces, plan_bucket *bk,
                         const ws_plan_block *blocks, vec *pack, vec *out)
{
    size_t W = (size_t)p->world;
    for (size_t k = 0; k < p->n_buckets; k++) {
        const size_t *c = p->x_counts + k * 4 * W;
        void *send, *recv;
        WS_TRY(ws_tensor_access(&p->x_send[k % 2], WS_ACCESS_WRITE, "send", &send));
        WS_TRY(ws_tensor_access(&p->x_recv[k % 2], WS_ACCESS_WRITE, "recv", &recv));
        size_t pack_begin = pack->n, out_begin = out->n, bytes;
        for (int q = 0; q < p->world; q++) {
            if (q == p->rank) { /* with the packing, before the bucket's collective */
                WS_TRY(x_part(p, pieces, bk[k].piece_begin, bk[k].piece_end, blocks, q, 0, pack,
                              pack_begin, NULL, &bytes));
                continue;
            }
            WS_TRY(x_part(p, pieces, bk[k].piece_begin, bk[k].piece_end, blocks, q, 1, pack,
                          pack_begin, (char *)send + c[W + (size_t)q], &bytes));
            WS_TRY(x_part(p, pieces, bk[k].piece_begin, bk[k].piece_end, blocks, q, 0, out,
                          out_begin, (char *)recv + c[3 * W + (size_t)q], &bytes));
        }
        bk[k].pack_begin = pack_begin;
        bk[k].pack_end = pack->n;
        bk[k].out_begin = out_begin;
        bk[k].out_end = out->n;
    }
    return WS_OK;
}

/* Direct messages: a run this large is a message of its own; smaller ones
 * share one, up to D_MSG_MAX bytes (under MPI's int counts). */
#define D_RUN_MIN ((size_t)64 << 10)
#define D_MSG_MAX ((size_t)1 << 30)

/* The messages one rank exchanges with one peer in one bucket, under
 * construction: each message's first run is an index into `runs` until
 * d_fix turns it into a pointer. Where messages begin and end, and whether
 * each is scattered, depends only on the sizes of the runs added, in order,
 * so the two ends of a message, adding the same runs' sizes in the same
 * order, build messages of equal bytes that travel the same way. Only the
 * runs a message is laid over may differ (d_flush joins runs adjacent in
 * this rank's memory). */
typedef struct d_build {
    vec *msgs, *runs;
    vec small; /* runs under D_RUN_MIN, sent together by d_flush */
    int peer, send;
} d_build;

static ws_status d_open(d_build *b, int scattered)
{
    ws_comm_msg g = {b->peer, b->send, scattered, NULL, 0, 0};
    g.runs = (const ws_comm_run *)(uintptr_t)b->runs->n;
    return vec_push(b->msgs, &g, sizeof g);
}

static ws_status d_add(d_build *b, void *ptr, size_t bytes)
{
    ws_comm_run r = {ptr, bytes};
    if (bytes < D_RUN_MIN) return vec_push(&b->small, &r, sizeof r);
    WS_TRY(d_open(b, 0));
    WS_TRY(vec_push(b->runs, &r, sizeof r));
    ws_comm_msg *g = (ws_comm_msg *)b->msgs->data + b->msgs->n - 1;
    g->n_runs = 1;
    g->bytes = bytes;
    return WS_OK;
}

/* The small runs, in order: a new message when the next would pass
 * D_MSG_MAX; a run that continues the last one in memory joins it. Frees
 * the builder's list, also on error. */
static ws_status d_flush(d_build *b)
{
    const ws_comm_run *sr = b->small.data;
    ws_comm_msg *g = NULL;
    ws_status rc = WS_OK;
    for (size_t i = 0; i < b->small.n && rc == WS_OK; i++) {
        if (!g || g->bytes + sr[i].bytes > D_MSG_MAX) {
            rc = d_open(b, 1);
            if (rc != WS_OK) break;
            g = (ws_comm_msg *)b->msgs->data + b->msgs->n - 1;
        }
        ws_comm_run *last = g->n_runs ? (ws_comm_run *)b->runs->data + b->runs->n - 1 : NULL;
        if (last && (char *)last->ptr + last->bytes == (char *)sr[i].ptr) {
            last->bytes += sr[i].bytes;
        } else {
            rc = vec_push(b->runs, &sr[i], sizeof sr[i]);
            if (rc == WS_OK) g->n_runs++;
        }
        g->bytes += sr[i].bytes;
    }
    free(b->small.data);
    memset(&b->small, 0, sizeof b->small);
    return rc;
}

/* The finished messages become the plan's (runs now pointers); on error
 * both lists are freed. */
static ws_status d_fix(ws_plan *p, vec *msgs, vec *runs, ws_status rc)
{
    if (rc != WS_OK) {
        free(msgs->data);
        free(runs->data);
        return rc;
    }
    ws_comm_msg *g = msgs->data;
    for (size_t i = 0; i < msgs->n; i++)
        g[i].runs = (ws_comm_run *)runs->data + (uintptr_t)g[i].runs;
    p->msgs = msgs->data;
    p->n_msgs = msgs->n;
    p->runs = runs->data;
    return WS_OK;
}

/* Where a sender's run of flat elements starting at x lies: in its shard,
 * or, for an entry that converts, in its piece packed (converted) into
 * sendbuf, the gather's layout (NULL: no entry of this rank converts). */
static void *d_src(const ws_plan *p, const plan_piece *pc, int64_t x, char *sendbuf)
{
    const plan_entry *e = &p->entries[pc->entry];
    int64_t in_shard = x - (int64_t)p->rank * e->shard;
    if (!sendbuf || e->src.dtype == e->dst.dtype) return side_ptr(&e->src, in_shard);
    return sendbuf + pc->off + (size_t)(in_shard - pc->a) * ws_dtype_size(e->dst.dtype);
}

/* The messages of one part of an exchange (as x_part: this rank's send to
 * `peer`, or its recv from `peer`, for pieces [from, to)). Both ends walk
 * the same runs in the same order. */
static ws_status d_part(const ws_plan *p, const plan_piece *pieces, size_t from, size_t to,
                        const ws_plan_block *blocks, int peer, int send, char *sendbuf,
                        vec *msgs, vec *runs)
{
    int owner = send ? p->rank : peer, holder = send ? peer : p->rank;
    d_build bd = {msgs, runs, {0}, peer, send};
    ws_status rc = WS_OK;
    for (size_t i = from; i < to && rc == WS_OK; i++) {
        const plan_piece *pc = &pieces[i];
        const plan_entry *e = &p->entries[pc->entry];
        const ws_plan_block *b = &blocks[(size_t)holder * p->n_entries + pc->entry];
        int64_t lo, hi, x, n, at;
        shard_span(e, owner, pc->a, pc->b, &lo, &hi);
        size_t es = ws_dtype_size(e->dst.dtype);
        run_iter it;
        runs_begin(&it, b, lo, hi);
        while (rc == WS_OK && runs_next(&it, &x, &n, &at))
            rc = d_add(&bd, send ? d_src(p, pc, x, sendbuf) : side_ptr(&e->dst, at),
                       (size_t)n * es);
    }
    ws_status f = d_flush(&bd);
    return rc != WS_OK ? rc : f;
}

/* Every bucket's direct messages (p->msgs, p->runs) and the copies of each
 * rank's own part, straight from its shard into its blocks (as pack). A
 * rank whose entries convert (converts) first packs those entries' pieces of
 * each bucket, converted, into its send segment, as the gather does, and
 * sends them from there; the others still go straight from the shard.
 * *received: the bytes its destinations take per execution, its own part's
 * included. */
static ws_status d_msgs(ws_plan *p, const plan_piece *pieces, plan_bucket *bk,
                        const ws_plan_block *blocks, int converts, vec *pack, size_t *received)
{
    vec msgs = {0}, runs = {0};
    ws_status rc = WS_OK;
    *received = 0;
    for (size_t k = 0; k < p->n_buckets && rc == WS_OK; k++) {
        size_t bytes;
        void *sendbuf = NULL;
        bk[k].pack_begin = pack->n;
        bk[k].msg_begin = msgs.n;
        if (converts) {
            const plan_bucket *g = &p->buckets[k];
            rc = ws_tensor_access(pack_side(p, k), WS_ACCESS_WRITE, "send", &sendbuf);
            for (size_t i = g->pack_begin; i < g->pack_end && rc == WS_OK; i++)
                if (p->pack[i].src_dtype != p->pack[i].dst_dtype)
                    rc = vec_push(pack, &p->pack[i], sizeof p->pack[i]);
        }
        for (int q = 0; q < p->world && rc == WS_OK; q++) {
            size_t own = pack->n;
            if (q == p->rank)
                rc = x_part(p, pieces, bk[k].piece_begin, bk[k].piece_end, blocks, q, 0, pack,
                            own, NULL, &bytes);
            for (size_t i = own; i < pack->n && rc == WS_OK; i++) {
                const ws_copy_desc *d = (const ws_copy_desc *)pack->data + i;
                *received += d->count * ws_dtype_size(d->dst_dtype);
            }
            for (int send = 1; send >= 0 && q != p->rank && rc == WS_OK; send--)
                rc = d_part(p, pieces, bk[k].piece_begin, bk[k].piece_end, blocks, q, send,
                            sendbuf, &msgs, &runs);
        }
        bk[k].pack_end = pack->n;
        bk[k].out_begin = bk[k].out_end = 0;
        bk[k].msg_end = msgs.n;
    }
    const ws_comm_msg *g = msgs.data;
    for (size_t i = 0; i < msgs.n && rc == WS_OK; i++)
        if (!g[i].send) *received += g[i].bytes;
    return d_fix(p, &msgs, &runs, rc);
}

static ws_status x_staging(ws_plan *p, size_t send_bytes, size_t recv_bytes)
{
    int pairs = p->n_buckets > 1 ? 2 : 1;
    int64_t sn = (int64_t)(send_bytes ? send_bytes : PLAN_ALIGN);
    int64_t rn = (int64_t)(recv_bytes ? recv_bytes : PLAN_ALIGN);
    for (int j = 0; j < pairs; j++) {
        WS_TRY(new_pair(p, &p->x_send[j], &p->x_recv[j], sn, rn, "exchange ", j));
        p->x_pairs = j + 1;
    }
    return WS_OK;
}

/* Every rank's block of every entry, gathered over the plan's comm:
 * blocks[r * n_entries + i]. */
static ws_status x_blocks(ws_plan *p, ws_plan_block **out)
{
    size_t n = p->n_entries, W = (size_t)p->world;
    ws_tensor mine = {0}, all = {0};
    ws_tensor_opts opts = {.device = ws_device_cpu(), .name = "plan exchange blocks"};
    int64_t mn = (int64_t)(5 * n), an = (int64_t)(5 * n * W);
    *out = ws_calloc(n * W + 1, sizeof **out);
    if (!*out) return WS_ERR(WS_ERR_NOMEM, "out of host memory for %zu blocks", n * W);
    ws_status rc = ws_tensor_empty(&mine, WS_I64, 1, &mn, &opts);
    if (rc == WS_OK) rc = ws_tensor_empty(&all, WS_I64, 1, &an, &opts);
    void *mp = NULL, *ap = NULL;
    if (rc == WS_OK) rc = ws_tensor_access(&mine, WS_ACCESS_WRITE, "blocks", &mp);
    if (rc == WS_OK) {
        int64_t *m = mp;
        for (size_t i = 0; i < n; i++) {
            const ws_plan_block *b = &p->entries[i].block;
            int64_t v[5] = {b->cols, b->row_begin, b->row_end, b->col_begin, b->col_end};
            memcpy(m + 5 * i, v, sizeof v);
        }
        ws_tensor_mark_written(&mine);
        rc = ws_comm_all_gather(p->comm, &mine, &all, NULL);
    }
    if (rc == WS_OK) rc = ws_tensor_access(&all, WS_ACCESS_READ, "blocks", &ap);
    if (rc == WS_OK) {
        const int64_t *a = ap;
        for (size_t j = 0; j < n * W; j++) {
            ws_plan_block *b = &(*out)[j];
            b->cols = a[5 * j];
            b->row_begin = a[5 * j + 1];
            b->row_end = a[5 * j + 2];
            b->col_begin = a[5 * j + 3];
            b->col_end = a[5 * j + 4];
        }
    }
    ws_tensor_free(&mine);
    ws_tensor_free(&all);
    return rc;
}

/* Collective, on every rank after the plan shapes agreed: decides whether
 * this plan exchanges and, if so, replaces the gather's copies and staging
 * with the exchange's. Every decision is taken from what all ranks share,
 * so every rank takes the same one. */
static ws_status plan_exchange(ws_plan *p)
{
    int has_blocks = 0, converts = 0;
    for (size_t i = 0; i < p->n_entries; i++) {
        has_blocks |= p->entries[i].block.cols != 0;
        converts |= p->entries[i].src.dtype != p->entries[i].dst.dtype;
    }
    int direct_ok = p->exchange == WS_PLAN_EXCHANGE_AUTO &&
                    ws_comm_can_transfer(p->comm, p->device);
    int64_t any[2] = {has_blocks, !direct_ok};
    WS_TRY(ws_comm_max_i64(p->comm, any, 2));
    p->x_planned = 1;
    int direct = any[1] == 0;
    if (!any[0] && !direct) return WS_OK;
    ws_plan_block *blocks = NULL;
    vec pieces = {0}, buckets = {0}, pack = {0}, out = {0};
    size_t send_max = 0, recv_max = 0, received = 0;
    ws_status rc = x_blocks(p, &blocks);
    /* The gather's layout again: the same buckets, now with their pieces. */
    if (rc == WS_OK) rc = lay_out(p, p->seg_bytes, PLAN_ALIGN, &pieces, &buckets);
    if (rc == WS_OK && buckets.n != p->n_buckets)
        rc = WS_ERR(WS_ERR_ARG, "the layout changed while planning (%zu buckets, then %zu)",
                    p->n_buckets, buckets.n);
    if (rc == WS_OK)
        rc = x_count(p, pieces.data, buckets.data, blocks, &send_max, &recv_max, &received);
    /* The ranks agree on the largest count and on any failure so far. */
    int64_t g[2] = {rc != WS_OK, (int64_t)received};
    ws_status arc = ws_comm_max_i64(p->comm, g, 2);
    if (rc == WS_OK && arc != WS_OK) rc = arc;
    if (rc == WS_OK && g[0])
        rc = WS_ERR(WS_ERR_COMM, "another rank could not plan the exchange (see its message)");
    /* A near tie keeps the staged gather: a staged exchange packs a part
     * for every peer. Direct messages cost nothing to pack. */
    int fewer = (size_t)g[1] / 7 * 8 < p->stats.bytes_gathered_full;
    int on = rc == WS_OK && (direct || fewer);
    if (on) {
        /* Every rank builds; they agree once more so none exchanges alone. */
        if (direct) {
            rc = d_msgs(p, pieces.data, buckets.data, blocks, converts, &pack, &received);
        } else {
            rc = x_staging(p, send_max, recv_max);
            if (rc == WS_OK) rc = x_descs(p, pieces.data, buckets.data, blocks, &pack, &out);
        }
        int64_t f[1] = {rc != WS_OK};
        arc = ws_comm_max_i64(p->comm, f, 1);
        if (rc == WS_OK && arc != WS_OK) rc = arc;
        if (rc == WS_OK && f[0])
            rc = WS_ERR(WS_ERR_COMM, "another rank could not plan the exchange (see its "
                        "message)");
    }
    if (rc == WS_OK && on) {
        const plan_bucket *bk = buckets.data;
        for (size_t k = 0; k < p->n_buckets; k++) {
            p->buckets[k].pack_begin = bk[k].pack_begin;
            p->buckets[k].pack_end = bk[k].pack_end;
            p->buckets[k].out_begin = bk[k].out_begin;
            p->buckets[k].out_end = bk[k].out_end;
            p->buckets[k].msg_begin = bk[k].msg_begin;
            p->buckets[k].msg_end = bk[k].msg_end;
        }
        free(p->pack);
        free(p->out);
        p->pack = pack.data;
        p->n_pack = pack.n;
        p->out = out.data;
        p->n_out = out.n;
        pack.data = out.data = NULL;
        /* The gather's staging is not needed any more (but a converting
         * direct plan's send segments). */
        drop_staging(p, direct && converts);
        p->x_on = 1;
        p->x_direct = direct;
        p->stats.exchanged = any[0] && fewer;
        p->stats.direct = direct;
        p->stats.bytes_gathered = received;
        p->stats.staging_bytes = direct ? p->stats.staging_bytes
                                        : (size_t)p->x_pairs * (send_max + recv_max);
    }
    if (!p->x_on) { /* the gather stays: nothing of the exchange is kept */
        drop_exchange(p);
        p->x_planned = 1;
    }
    free(blocks);
    free(pieces.data);
    free(buckets.data);
    free(pack.data);
    free(out.data);
    if (rc != WS_OK) ws_errprefix("plan '%s': planning the exchange", p->name);
    return rc;
}

/* The messages of every bucket of a direct relay over `comm`. shards = 1:
 * trainer ranks send their shard pieces to every engine rank (ranks from
 * p->world on), each engine rank receives every trainer rank's; shards = 0:
 * the relay's sender sends its gathered segment to every engine rank (relay
 * ranks from 1 on). Both ends walk the bucket's pieces, and each trainer
 * rank's part of each, in the same order. */
static ws_status relay_msgs(ws_plan *p, ws_comm *comm, int shards, int converts, vec *msgs,
                            vec *runs)
{
    vec pieces = {0}, buckets = {0};
    ws_status rc = lay_out(p, p->seg_bytes, PLAN_ALIGN, &pieces, &buckets);
    if (rc == WS_OK && buckets.n != p->n_buckets)
        rc = WS_ERR(WS_ERR_ARG, "the layout changed while planning (%zu buckets, then %zu)",
                    p->n_buckets, buckets.n);
    const plan_piece *pcs = pieces.data;
    const plan_bucket *bk = buckets.data;
    int sender = p->role == WS_PLAN_SENDER, n = ws_comm_size(comm);
    /* This rank's peers, [q0, q1), and the trainer ranks whose parts it
     * walks, [r0, r1). */
    int q0 = sender ? (shards ? p->world : 1) : 0, q1 = sender ? n : shards ? p->world : 1;
    int r0 = shards && sender ? p->rank : 0, r1 = shards && sender ? p->rank + 1 : p->world;
    for (size_t k = 0; k < p->n_buckets && rc == WS_OK; k++) {
        plan_bucket *b = &p->buckets[k];
        void *recv = NULL, *sendbuf = NULL;
        b->msg_begin = msgs->n;
        if (sender && !shards)
            rc = ws_tensor_access(&p->recv[k % 2], WS_ACCESS_WRITE, "recv", &recv);
        if (sender && shards && converts)
            rc = ws_tensor_access(pack_side(p, k), WS_ACCESS_WRITE, "send", &sendbuf);
        for (int q = q0; q < q1 && rc == WS_OK; q++) {
            d_build bd = {msgs, runs, {0}, q, sender};
            int from = shards && !sender ? q : r0, to = shards && !sender ? q + 1 : r1;
            for (size_t i = bk[k].piece_begin; i < bk[k].piece_end && rc == WS_OK; i++) {
                const plan_entry *e = &p->entries[pcs[i].entry];
                size_t es = ws_dtype_size(e->dst.dtype);
                for (int r = from; r < to && rc == WS_OK; r++) {
                    int64_t lo, hi;
                    shard_span(e, r, pcs[i].a, pcs[i].b, &lo, &hi);
                    if (hi <= lo) continue;
                    void *at = !sender ? side_ptr(&e->dst, lo)
                               : shards ? d_src(p, &pcs[i], lo, sendbuf)
                                        : (char *)recv + (size_t)r * b->seg_used + pcs[i].off;
                    rc = d_add(&bd, at, (size_t)(hi - lo) * es);
                }
            }
            ws_status f = d_flush(&bd);
            if (rc == WS_OK) rc = f;
        }
        b->msg_end = msgs->n;
    }
    free(pieces.data);
    free(buckets.data);
    return rc;
}

/* Collective, once per planning, over the peers (every rank) and then the
 * relay (its sender and the engine ranks). With peers, where their comm
 * sends host memory point to point, no dtype converts and no engine rank's
 * destinations are blocks, the trainer ranks send their shards straight to
 * the engine ranks. Else, where the relay's comm can and there are no
 * blocks, the relay's sender sends each gathered bucket straight into the
 * engine ranks' destinations instead of broadcasting it into their staging.
 * Else the broadcast stays. */
static ws_status plan_relay(ws_plan *p)
{
    int blocks = 0, converts = 0, sender = p->role == WS_PLAN_SENDER;
    for (size_t i = 0; i < p->n_entries; i++) {
        blocks |= p->entries[i].block.cols != 0;
        converts |= sender && p->entries[i].src.dtype != p->entries[i].dst.dtype;
    }
    int auto_ = p->exchange == WS_PLAN_EXCHANGE_AUTO;
    p->x_planned = 1;
    ws_comm *comm = NULL;
    int shards = 0;
    if (p->peers) {
        int64_t g[1] = {!(auto_ && !blocks && ws_comm_can_transfer(p->peers, p->device))};
        WS_TRY(ws_comm_max_i64(p->peers, g, 1));
        if (!g[0]) comm = p->peers, shards = 1;
    }
    /* Without peers the first trainer rank is the only sender. It sends
     * straight into one engine rank's tensors; to several it broadcasts,
     * whose tree sends each bucket about once instead of once per engine
     * rank. (The relay's size is the same on every rank of it.) */
    if (!comm && p->relay && ws_comm_size(p->relay) == 2) {
        int64_t g[1] = {!(auto_ && !blocks && ws_comm_can_transfer(p->relay, p->device))};
        WS_TRY(ws_comm_max_i64(p->relay, g, 1));
        if (!g[0]) comm = p->relay;
    }
    if (!comm) return WS_OK;
    vec msgs = {0}, runs = {0};
    ws_status rc = relay_msgs(p, comm, shards, converts, &msgs, &runs);
    /* Every rank builds; none sends directly alone. */
    int64_t f[1] = {rc != WS_OK};
    ws_status arc = ws_comm_max_i64(comm, f, 1);
    if (rc == WS_OK && arc != WS_OK) rc = arc;
    if (rc == WS_OK && f[0])
        rc = WS_ERR(WS_ERR_COMM, "another rank could not plan the relay (see its message)");
    rc = d_fix(p, &msgs, &runs, rc);
    if (rc != WS_OK) {
        ws_errprefix("plan '%s': planning the relay", p->name);
        return rc;
    }
    p->x_direct = 1;
    p->x_shards = shards && sender;
    p->x_comm = comm;
    p->stats.direct = 1;
    /* An engine rank stages nothing any more, nor does a trainer rank that
     * sends its own shard, unless it packs converted values to send. */
    /* Only converting entries are still packed (keep_pack); in place, as
     * the buckets' ranges only shrink. */
    int keep_pack = sender && shards && converts;
    size_t kept = 0;
    if (!sender || shards) {
        for (size_t k = 0; k < p->n_buckets; k++) {
            plan_bucket *b = &p->buckets[k];
            size_t from = kept;
            for (size_t i = b->pack_begin; i < b->pack_end && keep_pack; i++)
                if (p->pack[i].src_dtype != p->pack[i].dst_dtype) p->pack[kept++] = p->pack[i];
            b->out_begin = b->out_end = 0;
            b->pack_begin = from;
            b->pack_end = kept;
        }
        p->n_pack = kept;
        drop_staging(p, keep_pack);
    }
    /* What this rank sends (the sender) or receives (an engine rank). */
    size_t moved = 0;
    for (size_t i = 0; i < p->n_msgs; i++) moved += p->msgs[i].bytes;
    p->stats.bytes_relayed = moved;
    if (shards) p->stats.bytes_gathered = p->stats.bytes_gathered_full = 0; /* no gather */
    return WS_OK;
}

static ws_status start_exchange(ws_plan *p, size_t k, ws_comm_request **req)
{
    if (p->x_direct) {
        const plan_bucket *b = &p->buckets[k];
        ws_status rc = ws_comm_transfer(p->comm, p->device, p->msgs + b->msg_begin,
                                        b->msg_end - b->msg_begin, req);
        if (rc != WS_OK)
            ws_errprefix("plan '%s': transfer of bucket %zu of %zu", p->name, k + 1,
                         p->n_buckets);
        return rc;
    }
    size_t W = (size_t)p->world;
    const size_t *c = p->x_counts + k * 4 * W;
    ws_status rc = ws_comm_all_to_all(p->comm, &p->x_send[k % 2], c, c + W, &p->x_recv[k % 2],
                                      c + 2 * W, c + 3 * W, req);
    if (rc != WS_OK)
        ws_errprefix("plan '%s': all_to_all of bucket %zu of %zu", p->name, k + 1, p->n_buckets);
    return rc;
}
