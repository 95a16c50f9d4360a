/* remote.h: weights handed to an engine in another process.
 *
 * A sender (the trainer side) and a receiver (the engine side, which owns the
 * live parameters) talk over a channel (chan.h) and move bytes through two
 * shared-memory slots (shm.h): the sender packs bucket k+1 into one slot
 * while the receiver copies bucket k out of the other into its parameters,
 * and a slot is packed again only after the receiver acknowledged it.
 *
 * The protocol (version WS_REMOTE_PROTOCOL). Every message is one channel
 * message of the type below (the channel splits a long one into frames and
 * joins them again); integers in host byte order, no padding; a string is u16
 * length, its bytes, then a NUL.
 *
 *   HELLO    u32 protocol, i32 pid, str role        both ways, sender first
 *   MANIFEST u64 weight_version, u32 flags, u32 n,
 *            n x {str name, u8 dtype, u8 ndim, i64 shape[ndim]}
 *            sender -> receiver: the tensors this sync writes. The receiver
 *            checks them against its own parameters before any byte moves
 *            and answers ACK, or ERROR naming the first tensor that it lacks,
 *            that differs in dtype or shape, that appears twice, or (unless
 *            flags has WS_MANIFEST_PARTIAL) that the manifest leaves out.
 *   SLOTS    u32 n (2), u64 bytes[n], u8 kind; kind WS_SLOTS_HOST: n fds
 *            (memfds, size sealed); WS_SLOTS_GPU: n x 64-byte CUDA IPC
 *            handles (the receiver maps them on the GPU its tensors are on)
 *            sender -> receiver, once per connection after the first
 *            manifest; the receiver maps them read-only and answers ACK.
 *   BUCKET   u64 seq, u32 slot, u32 n,
 *            n x {u32 tensor, u64 elem_offset, u64 elem_count, u64 byte_offset}
 *            `tensor` indexes the manifest; elements are counted in the
 *            tensor's row-major order, so a row shard is one piece. The
 *            receiver copies each piece from the slot into its parameter,
 *            adds the checksum of the elements just written to that
 *            tensor's landed sum (unless the manifest has
 *            WS_MANIFEST_UNPROVEN), and answers ACK(BUCKET, slot, seq) once
 *            the copy is complete.
 *   FINISH   u64 weight_version, proofs
 *            The receiver checks that every element arrived; then, with
 *            proofs, that they name manifest tensors and cover each exactly
 *            (counts summing to its element count), and that per tensor the
 *            proofs' checksums sum to its landed sum. Only then are the
 *            tensors valid: ACK, or ERROR naming the first tensor (and the
 *            proof's label and elements) that differs, found by
 *            checksumming the ranges afresh. A refused FINISH ends the sync
 *            with its tensors invalid; the connection lives on. No proofs:
 *            every element arrived is enough.
 *   VERIFY   u32 flags, proofs                     sender -> receiver, outside a sync
 *            The receiver checks each named tensor exists and is valid, and
 *            (unless flags has WS_VERIFY_VALIDITY) that the checksum of its
 *            range, computed afresh, equals the proof's; a tensor that
 *            differs is marked invalid. ACK, or ERROR naming the first.
 *   proofs   u32 n, n x {str tensor, str label ("" for none),
 *                        u64 elem_offset, u64 elem_count, u64 checksum}
 *            The checksum is ws_tensor_checksum of the range in the tensor's
 *            own dtype with first index elem_offset (dtype.h: a sum over
 *            elements, so ranges add up to the whole tensor's).
 *   WAKE     str tag ("weights", "kv_cache")      sender -> receiver
 *   SLEEP    i32 level                            sender -> receiver
 *            The receiver runs its callback and answers ACK or ERROR. After
 *            a level-2 sleep every tensor is invalid (its bytes discarded).
 *   ACK      u32 type acknowledged, u32 slot (WS_ACK_NO_SLOT), u64 seq
 *   ERROR    the message text (no NUL)            receiver -> sender
 *   CLOSE    empty: the sender leaves on purpose  sender -> receiver
 *            No answer, except from a receiver that mapped GPU slots: it
 *            unmaps them, then answers ACK(CLOSE), and only then does the
 *            sender free them (CUDA IPC memory must not be freed while
 *            another process has it open). A sender with GPU slots says
 *            CLOSE also in the middle of a sync (that sync's tensors stay
 *            invalid, as when the connection ends).
 *
 *   SHARED   u32 first, u32 n (<= 8), u64 bytes[n], u8 last;
 *            last: u32 m, m x {str name, u32 chunk, u64 offset, u64 bytes}
 *            n fds (memfds, size sealed)             receiver -> sender
 *            Right after the receiver's HELLO, one or more (the last has
 *            last = 1; with no shared memory: n = 0, m = 0): the chunks of
 *            memory its tensors made by ws_receiver_alloc live in, and where
 *            each tensor is. The sender maps them read-write, so a sync with
 *            WS_MANIFEST_DIRECT writes those tensors in place, without slots:
 *            MANIFEST, FINISH (the receiver checksums the tensors then).
 *
 * A sync is MANIFEST, [SLOTS], BUCKET..., FINISH. From an accepted manifest
 * until the FINISH is verified, the tensors it names are invalid on the
 * receiver: if the sender dies, stops answering or sends anything wrong in
 * between, the receiver reports it (naming the sender's pid) and keeps them
 * marked invalid, never half-written and trusted. */
#ifndef WS_REMOTE_H
#define WS_REMOTE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "status.h"
#include "tensor.h"

#define WS_REMOTE_PROTOCOL 3u
#define WS_REMOTE_SLOTS 2
#define WS_REMOTE_ALIGN 64 /* byte offset of every piece in a slot */
#define WS_ACK_NO_SLOT 0xFFFFFFFFu

enum ws_remote_msg {
    WS_MSG_HELLO = 1,
    WS_MSG_MANIFEST,
    WS_MSG_SLOTS,
    WS_MSG_BUCKET,
    WS_MSG_ACK,
    WS_MSG_FINISH,
    WS_MSG_WAKE,
    WS_MSG_SLEEP,
    WS_MSG_ERROR,
    WS_MSG_CLOSE,
    WS_MSG_VERIFY,
    WS_MSG_SHARED
};
const char *ws_remote_msg_name(uint32_t type); /* "BUCKET" */

enum {
    WS_MANIFEST_PARTIAL = 1u, /* a sync of some tensors (adapters only) */
    /* The sync ends with ws_sender_finish_proven(s, NULL, 0): the receiver
     * skips checksumming what lands, and refuses proofs at FINISH. */
    WS_MANIFEST_UNPROVEN = 2u,
    /* The sender wrote the tensors in place, in the memory the receiver
     * shares (ws_receiver_alloc): no buckets come; at FINISH the receiver
     * checksums each tensor whole for the proofs (or, unproven, trusts it). */
    WS_MANIFEST_DIRECT = 4u
};

/* One tensor of a manifest: the receiver's tensor, whole. */
typedef struct ws_wire_tensor {
    const char *name;
    ws_dtype dtype;
    int ndim;
    int64_t shape[WS_MAX_DIMS];
} ws_wire_tensor;

/* A piece already in a slot, as BUCKET carries it. */
typedef struct ws_wire_piece {
    uint32_t tensor;
    uint64_t elem_offset, elem_count, byte_offset;
} ws_wire_piece;

/* What the receiver must hold: elements [elem_offset, elem_offset +
 * elem_count) of its tensor `tensor` (by name), whose checksum
 * (ws_tensor_checksum of that range, as the tensor's own dtype, with first
 * index elem_offset, i.e. each element's index in the whole tensor) is
 * `checksum`. `label` names the range in errors (the trainer parameter it
 * came from); NULL: none. */
typedef struct ws_proof {
    const char *tensor;
    const char *label;
    uint64_t elem_offset, elem_count, checksum;
} ws_proof;

enum { WS_SLOTS_HOST = 0, WS_SLOTS_GPU = 1 }; /* SLOTS: memfds, or CUDA IPC handles */
enum { WS_VERIFY_VALIDITY = 1u }; /* ws_sender_verify: only that the tensors are valid, no checksums */

/* ---- receiver (engine side) ------------------------------------------------------- */

typedef struct ws_receiver ws_receiver;

typedef struct ws_receiver_opts {
    const char *role;  /* how the sender's messages name this side; NULL: "engine" */
    int timeout_ms;    /* longest wait for the next message inside a sync; 0: 30000 */
    /* Run on WAKE and SLEEP; a failure is reported to the sender (ERROR) and
     * returned. NULL: acknowledged without doing anything. */
    ws_status (*on_wake)(void *ctx, const char *tag);
    ws_status (*on_sleep)(void *ctx, int level);
    void *ctx;
    /* Checked at least every WS_CHAN_LIVENESS_MS while waiting and when a
     * signal interrupts a wait: non-zero stops it with WS_ERR_INTERRUPTED
     * (a Python caller checks for Ctrl-C here). NULL: never. */
    int (*interrupted)(void *ctx);
} ws_receiver_opts;

typedef enum ws_weights_state {
    WS_WEIGHTS_NONE = 0, /* never synced */
    WS_WEIGHTS_SYNCING,  /* a sync is under way */
    WS_WEIGHTS_VALID,    /* every tensor holds verified bytes */
    WS_WEIGHTS_INVALID   /* a sync was cut short: some tensors are not to be trusted */
} ws_weights_state;
const char *ws_weights_state_name(ws_weights_state s); /* "valid" */

typedef enum ws_receiver_event_kind {
    WS_RECV_CONNECTED = 1, /* a sender said hello */
    WS_RECV_MANIFEST,      /* a sync began */
    WS_RECV_SLOTS,
    WS_RECV_BUCKET,
    WS_RECV_SYNCED,        /* a sync finished and was verified */
    WS_RECV_WAKE,
    WS_RECV_SLEEP,
    WS_RECV_CLOSED,        /* the sender left (CLOSE) */
    WS_RECV_VERIFIED       /* a VERIFY was answered with ACK */
} ws_receiver_event_kind;

typedef struct ws_receiver_event {
    ws_receiver_event_kind kind;
    uint64_t weight_version; /* MANIFEST, SYNCED */
    size_t pieces, bytes;    /* BUCKET */
} ws_receiver_event;

/* Listens on channel `name` (chan.h: abstract, nothing on disk). */
ws_status ws_receiver_create(const char *name, const ws_receiver_opts *opts, ws_receiver **out);
/* Unmaps, closes and forgets everything; NULL is fine. */
void ws_receiver_free(ws_receiver *r);
/* Allocates a tensor in memory this receiver shares with its senders
 * (memfd arenas, host memory) and registers it as `name`: a sender writes
 * it in place (WS_MANIFEST_DIRECT), one copy instead of two. *out is a view
 * that keeps the memory mapped (also after ws_receiver_free). Call before a
 * sender connects: the memory is announced at the greeting. */
ws_status ws_receiver_alloc(ws_receiver *r, const char *name, ws_dtype dtype, int ndim,
                            const int64_t *shape, ws_tensor *out);
/* Registers a destination: a contiguous tensor on any device, kept alive by
 * a view until ws_receiver_free. Names are unique. */
ws_status ws_receiver_add(ws_receiver *r, const char *name, const ws_tensor *t);
/* Waits up to timeout_ms (-1: forever) for a sender and its HELLO. */
ws_status ws_receiver_accept(ws_receiver *r, int timeout_ms);
/* A receiver keeps no global state: ws_receiver_next and ws_receiver_serve
 * may run on any one thread at a time (a Python caller releases the GIL
 * around them; the callbacks run on that thread). */
/* Handles one message, waiting up to timeout_ms (-1: forever; inside a sync
 * at most opts.timeout_ms). Accepts a sender first when none is connected.
 * On an error that ends the connection (the sender died, left mid-sync, or
 * broke the protocol) the receiver drops it and the next call accepts again. */
ws_status ws_receiver_next(ws_receiver *r, int timeout_ms, ws_receiver_event *ev);
/* Handles messages until the sender closes (WS_OK) or an error that ends the
 * connection or the wait. Requests the receiver refused and told the sender
 * about (a manifest that disagrees, a failed wake or sleep callback) do not
 * end it: they are the sender's errors to handle. */
ws_status ws_receiver_serve(ws_receiver *r, int timeout_ms);
ws_weights_state ws_receiver_state(const ws_receiver *r, uint64_t *weight_version);
/* 1 when the named tensor holds verified bytes, 0 when not, -1 unknown name. */
int ws_receiver_tensor_valid(const ws_receiver *r, const char *name);
/* The same, and when 0 copies into why (why_len bytes, cut short if
 * longer; "" when valid; NULL: not wanted) why it is not valid ("not
 * written by any sync yet", "discarded by the level-2 sleep after weight
 * version 3", the error that ended its sync). These queries and
 * ws_receiver_state may run on other threads while one serves: they read
 * under the receiver's lock. */
int ws_receiver_tensor_state(const ws_receiver *r, const char *name, char *why, size_t why_len);
/* The registered tensors, in the order of ws_receiver_add. */
size_t ws_receiver_count(const ws_receiver *r);
const char *ws_receiver_name(const ws_receiver *r, size_t i); /* NULL past the end */
pid_t ws_receiver_peer_pid(const ws_receiver *r); /* 0: no sender connected */

/* ---- sender (trainer side) -------------------------------------------------------- */

typedef struct ws_sender ws_sender;

typedef struct ws_sender_opts {
    const char *role;       /* how the receiver's messages name this side; NULL: "trainer" */
    int timeout_ms;         /* longest wait for a reply; 0: 30000 */
    int connect_timeout_ms; /* 0: 10000 */
    size_t slot_bytes;      /* each of the two slots; 0: 64 MiB */
    int (*interrupted)(void *ctx); /* as in ws_receiver_opts; NULL: never */
    void *ctx;
    /* Where the slots live: NULL or the cpu, host memfds; a GPU, memory
     * shared through CUDA IPC (cudaMalloc'ed, never the virtual memory
     * API's), for a receiver whose tensors are on a GPU. */
    ws_device *slot_device;
} ws_sender_opts;

/* One piece of a bucket: src (contiguous, the manifest tensor's dtype, any
 * device) holds elements [elem_offset, elem_offset + numel(src)) of manifest
 * tensor `tensor`. */
typedef struct ws_sender_piece {
    uint32_t tensor;
    uint64_t elem_offset;
    const ws_tensor *src;
} ws_sender_piece;

typedef struct ws_sender_stats {
    uint64_t buckets, bytes;
    double pack_ms; /* copying pieces into slots and checksumming them */
    double wait_ms; /* waiting for acknowledgements: the receiver's copies and round trips */
} ws_sender_stats;

/* Connects to the receiver listening on `name` (retrying until
 * connect_timeout_ms while it starts) and exchanges HELLO. */
ws_status ws_sender_connect(const char *name, const ws_sender_opts *opts, ws_sender **out);
/* Sends CLOSE when the connection is healthy, then unmaps and frees; NULL is fine. */
void ws_sender_close(ws_sender *s);
/* Starts a sync of n tensors: MANIFEST, the receiver's verdict, and on the
 * first sync the slots. Names are copied. */
ws_status ws_sender_begin(ws_sender *s, const ws_wire_tensor *tensors, size_t n,
                          uint64_t weight_version, unsigned flags);
/* Packs the pieces into a free slot (waiting for its acknowledgement first)
 * and sends the bucket; returns without waiting for this bucket's
 * acknowledgement, so the caller packs the next one meanwhile. Pieces must
 * fit one slot (their bytes, each rounded up to WS_REMOTE_ALIGN). */
ws_status ws_sender_bucket(ws_sender *s, const ws_sender_piece *pieces, size_t n);
/* After ws_sender_begin: waits until `slot` (0 or 1) is free (its last
 * bucket acknowledged) and returns its writable mapping, so a caller packs
 * in place (no copy inside the sender). */
ws_status ws_sender_slot(ws_sender *s, int slot, void **base, size_t *bytes);
/* Sends a BUCKET whose bytes the caller already put in `slot`; no copy, no
 * checksum. Checks every piece against the manifest and the slot (aligned
 * to WS_REMOTE_ALIGN, in range) before sending; a piece refused here sends
 * nothing and leaves the sync as it was. The slot is busy until its
 * acknowledgement (ws_sender_slot waits for it). */
ws_status ws_sender_submit(ws_sender *s, int slot, const ws_wire_piece *pieces, size_t n);
/* Waits for every acknowledgement, sends the checksums the sender summed
 * while packing (one whole-tensor proof per manifest tensor) and waits for
 * the receiver's verdict. Refused when a bucket of the sync was submitted
 * (ws_sender_submit: no sums here); use ws_sender_finish_proven then. */
ws_status ws_sender_finish(ws_sender *s);
/* Like ws_sender_finish, with the caller's proofs instead of the sender's
 * own packing sums. n == 0: no proof; the receiver marks the tensors valid
 * once every element arrived (verify=off). A refusal (elements missing,
 * proofs that do not cover the tensors, a checksum that differs) ends the
 * sync with the receiver's tensors invalid and leaves the sender usable. */
ws_status ws_sender_finish_proven(ws_sender *s, const ws_proof *proofs, size_t n);
/* Outside a sync: asks the receiver to prove it holds these ranges
 * (checksums computed fresh from its tensors), or with WS_VERIFY_VALIDITY
 * only that each named tensor is valid. Answer: ACK, or ERROR naming the
 * first tensor (and label) that is unknown, invalid (and why) or differs;
 * a refusal leaves the sender usable. */
ws_status ws_sender_verify(ws_sender *s, const ws_proof *proofs, size_t n, unsigned flags);
ws_status ws_sender_wake(ws_sender *s, const char *tag);
ws_status ws_sender_sleep(ws_sender *s, int level);
/* The receiver's tensor `name` made by ws_receiver_alloc, mapped here
 * read-write: *out is a view of dtype and shape (checked against its bytes)
 * that keeps the mapping alive (also after ws_sender_close). WS_ERR_ARG when
 * the receiver shares no tensor of that name. */
ws_status ws_sender_shared(ws_sender *s, const char *name, ws_dtype dtype, int ndim,
                           const int64_t *shape, ws_tensor *out);
size_t ws_sender_shared_count(const ws_sender *s); /* tensors the receiver shares */
pid_t ws_sender_peer_pid(const ws_sender *s);
size_t ws_sender_slot_bytes(const ws_sender *s);
ws_device *ws_sender_slot_device(const ws_sender *s); /* the cpu unless opts.slot_device */
ws_sender_stats ws_sender_get_stats(const ws_sender *s);

#endif
