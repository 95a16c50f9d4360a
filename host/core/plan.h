/* plan.h: sync plans, the bucketed transfer engine.
 *
 * A sync plan is built once and executed every step. Each entry moves one
 * FSDP-sharded trainer parameter into one engine destination:
 *   - src: this rank's shard, contiguous, shard_numel elements (FSDP2 pads
 *     uneven shards: shard_numel = ceil(numel / world), rank r holds flat
 *     elements [r * shard_numel, (r + 1) * shard_numel) of the full tensor,
 *     clipped to numel; the padding is never copied out);
 *   - dst: a contiguous engine view of exactly numel elements (a whole engine
 *     tensor or a slice of a fused one such as qkv_proj), any dtype; values
 *     are converted (round to nearest even) on the way. Or, with a block,
 *     only a sub-block of the full tensor: rows [r0, r1) x cols [c0, c1) of
 *     the tensor seen as [numel / cols, cols], packed row by row into a
 *     contiguous dst of (r1 - r0) * (c1 - c0) elements: a tensor-parallel
 *     engine rank's shard (rows of a column-parallel layer, columns of a
 *     row-parallel one), possibly empty. Such a plan exchanges instead of
 *     gathering (see the exchange below) when that moves fewer bytes.
 * Execution, per bucket: pack the shards (converted to the destination dtype,
 * so f32 master weights travel as bf16) into a send buffer, all_gather it
 * over the comm, then copy every rank's piece out into the destinations.
 * Two alternating buffers let the gather of bucket k+1 overlap the copy-out
 * of bucket k. A parameter larger than a bucket is streamed in pieces.
 * Staging memory is bounded: 2 x (bucket_bytes + bucket_bytes / world).
 * With a world of one nothing is staged: sources are copied (and converted)
 * straight into the destinations in one batched call per bucket.
 *
 * The exchange: when entries have blocks, the first execution (every rank
 * together) learns every rank's blocks and counts what an all_to_all would
 * bring each rank: per bucket, from every rank s, the part of s's shard
 * pieces that lies in this rank's blocks. When the largest of those counts
 * is below 7/8 of what the gather brings, the plan exchanges: each rank packs, for
 * every peer, its shard's intersection with that peer's block (one copy per
 * row piece where a block is a range of columns), runs one all_to_all per
 * bucket and copies what came into its destinations; double-buffered like
 * the gather, in the gather's buckets. A rank's own part goes straight from
 * its shard into its blocks. Its staging holds at most what a bucket sends
 * and receives (each under world x the bucket's segment, so under 2 x 2 x
 * bucket_bytes; about 2 x 2 x bucket_bytes / T for a TP=T engine); the
 * gather's staging is allocated for the first execution's planning, then
 * freed. A relay (disaggregated placement) keeps its broadcast.
 *
 * Direct: where the comm sends host memory point to point (MPI), the same
 * parts (with or without blocks: without, a part is the peer's whole shard
 * piece) travel as messages straight from this rank's shard into the peer's
 * destinations (ws_comm_transfer), with no staging, no pack and no
 * copy-out; a rank whose sources convert (f32 into bf16) packs each bucket,
 * converted, into a send segment first (2 x bucket / world of staging) and
 * sends from there. A part of a
 * bucket that is one contiguous run of at least 64 KiB on both sides is a
 * message of its own, which MPI can copy once from process to process; the
 * smaller runs a rank exchanges with a peer in a bucket travel together as
 * one message over their scattered addresses. Buckets still bound what is
 * in flight (two at a time) and when progress is reported. */
#ifndef WS_PLAN_H
#define WS_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "status.h"
#include "tensor.h"

typedef struct ws_plan ws_plan;

typedef struct ws_plan_stats {
    size_t entries;
    size_t buckets;          /* buckets per execution */
    size_t bytes_moved;      /* bytes written into destinations (their blocks, dst dtype) */
    size_t bytes_gathered;   /* bytes this rank receives through the collective: the
                              * gather's world * per-rank segments, or the exchange's */
    size_t bytes_gathered_full; /* what the gather of whole tensors would bring this rank */
    int exchanged;           /* 1: each rank receives only what its blocks need (the
                              * exchange), not whole tensors (the gather) */
    int direct;              /* 1: point-to-point messages straight between the shards
                              * and the destinations (staging only for converted
                              * sources' send segments) */
    size_t bytes_relayed;    /* a relay: bytes sent (the sender: once for a broadcast,
                              * once per engine rank for direct messages) or received;
                              * known once planned */
    size_t staging_bytes;    /* staging memory held during execution */
    double pack_ms, gather_ms, copy_out_ms, total_ms; /* last execution */
} ws_plan_stats;

/* Called after each bucket; return non-zero to stop (the plan reports
 * WS_ERR_INTERRUPTED). */
typedef int (*ws_plan_progress_fn)(void *ctx, size_t bucket, size_t buckets, size_t bytes_done,
                                   size_t bytes_total);

/* The bucket size when none is given, for every caller (the Lua library reads
 * it as ws.DEFAULT_BUCKET_BYTES). Large buckets mean few collectives per sync;
 * the staging memory it costs is bounded as described above. */
#define WS_PLAN_DEFAULT_BUCKET_BYTES ((size_t)512 << 20)

/* comm may be NULL (world of one). bucket_bytes: size of a gathered bucket. */
ws_status ws_plan_create(ws_comm *comm, ws_device *device, size_t bucket_bytes, const char *name,
                         ws_plan **out);
/* Adds entries; `numel[i]` is the full tensor's element count. The plan
 * keeps a reference to every tensor (views stay valid while the plan lives).
 * Checks shapes: src numel == ceil(numel / world), dst numel == numel,
 * contiguity, devices. */
ws_status ws_plan_add(ws_plan *p, const ws_tensor *const *srcs, const ws_tensor *const *dsts,
                      const int64_t *numel, size_t n);
/* The same with each entry's shard size given: shard[i] elements per rank
 * (rank r holds flat elements [r * shard[i], (r + 1) * shard[i]) clipped to
 * numel), e.g. FSDP2's dim-0 shards of a [rows, cols] tensor, ceil(rows /
 * world) * cols; 0 (or shard NULL) is ceil(numel / world). A src may hold
 * its whole shard or only its real elements (a last rank's shard without
 * the padding). */
ws_status ws_plan_add_sharded(ws_plan *p, const ws_tensor *const *srcs,
                              const ws_tensor *const *dsts, const int64_t *numel,
                              const int64_t *shard, size_t n);
/* Disaggregated placement: trainer and engine on different ranks. The
 * trainer ranks gather each bucket over their own comm (the plan's, FSDP over
 * `gather_world` ranks) as a colocated plan does; the first of them then
 * broadcasts the gathered bucket over `relay` (its rank 0 there) to the
 * engine ranks (its other ranks), which copy their blocks out of it. The
 * broadcast of bucket k overlaps the pack and gather of bucket k+1 on the
 * sender and the copy-out of bucket k-1 on the receivers.
 *   WS_PLAN_SENDER: a trainer rank; entries have srcs, no dsts, and give
 *     their wire dtype; `relay` only on the first trainer rank (NULL on
 *     the others); the plan's comm is the trainer ranks' comm (NULL for one).
 *   WS_PLAN_RECEIVER: an engine rank; entries have dsts, no srcs; the
 *     plan's comm is NULL; `gather_world` is the trainer ranks' count.
 * Call before any add. */
typedef enum ws_plan_role {
    WS_PLAN_COLOCATED = 0,
    WS_PLAN_SENDER,
    WS_PLAN_RECEIVER,
    WS_PLAN_REMOTE /* ws_plan_set_remote */
} ws_plan_role;
ws_status ws_plan_set_relay(ws_plan *p, ws_plan_role role, ws_comm *relay, int gather_world);
/* Disaggregated, optional, on every trainer and engine rank alike (after
 * ws_plan_set_relay): `all` is a comm of every rank, the trainer ranks first
 * (ranks [0, gather_world), in their trainer order), then the engine ranks.
 * Where it can send host memory point to point and no engine rank's
 * destinations are blocks, each trainer rank sends its shard straight into
 * every engine rank's destinations (no gather, no broadcast, no staging; a
 * converting one packs each bucket first and sends from there); else the
 * relay runs as without it. Every rank must give its plan the same peers
 * (all or none; ranks that differ raise, every one that can tell). The
 * ranks also agree over `all` before each execution, so a failure anywhere
 * stops every rank before a byte moves. */
ws_status ws_plan_set_peers(ws_plan *p, ws_comm *all);

/* Server mode: the engine is another process (remote.h). Entries have srcs
 * and no dsts, and give their wire dtype; ws_plan_set_targets then says
 * where each lands: the index of its engine tensor in the manifest of the
 * sync this plan sends, and the element at which the parameter starts in it
 * (a slice of a fused qkv_proj). Each bucket is packed (a world of one) or
 * gathered (world > 1) straight into one of the sender's two shared-memory
 * slots and handed over with ws_sender_submit, so the engine process copies
 * bucket k out while bucket k+1 is packed into the other slot. Every
 * execution must run inside a sync of the plan's manifest (between
 * ws_sender_begin and ws_sender_finish*); the plan runs where the slots are
 * (the host's memfds, or a GPU's memory shared through CUDA IPC: the
 * sender's slot_device) and each bucket (world x its segment) must fit a
 * slot. Call before any add. */
typedef struct ws_sender ws_sender;
ws_status ws_plan_set_remote(ws_plan *p, ws_sender *sender);
ws_status ws_plan_set_targets(ws_plan *p, const uint32_t *tensor, const int64_t *offset,
                              size_t n);

/* A destination block (see above): rows [row_begin, row_end) x columns
 * [col_begin, col_end) of the full tensor seen as [numel / cols, cols].
 * cols == 0: no block, the whole tensor. */
typedef struct ws_plan_block {
    int64_t cols;
    int64_t row_begin, row_end, col_begin, col_end;
} ws_plan_block;

/* ws_plan_add_sharded with each entry's destination block (blocks NULL: all
 * whole). A block's dst holds exactly its (row_end - row_begin) * (col_end -
 * col_begin) elements. wire: per entry the dtype the bucket carries, needed
 * where there are no dsts (a relay's sender; NULL: each dst's dtype). */
ws_status ws_plan_add_blocks(ws_plan *p, const ws_tensor *const *srcs,
                             const ws_tensor *const *dsts, const int64_t *numel,
                             const int64_t *shard, const ws_plan_block *blocks,
                             const ws_dtype *wire, size_t n);
/* How a colocated plan over several ranks moves bytes. AUTO (the default):
 * direct where the comm can send the plan's memory point to point, else as
 * STAGED. STAGED: through staging
 * buffers, exchanging when entries have blocks and that moves fewer bytes
 * than the gather. GATHER: always the staged gather of whole tensors.
 * Every rank must set the same. */
typedef enum ws_plan_exchange {
    WS_PLAN_EXCHANGE_AUTO = 0,
    WS_PLAN_EXCHANGE_GATHER,
    WS_PLAN_EXCHANGE_STAGED
} ws_plan_exchange;
ws_status ws_plan_set_exchange(ws_plan *p, ws_plan_exchange how);

/* Runs the plan: every rank must call it with the same plan shape. */
ws_status ws_plan_execute(ws_plan *p, ws_plan_progress_fn progress, void *ctx);
void ws_plan_get_stats(const ws_plan *p, ws_plan_stats *out);
/* The stats an execution would have (buckets, bytes moved and gathered,
 * staging memory) from the layout alone: touches no tensor memory and
 * allocates no staging, so a dry run can plan a model it could not hold. */
ws_status ws_plan_estimate(ws_plan *p, ws_plan_stats *out);
void ws_plan_destroy(ws_plan *p);

#endif
