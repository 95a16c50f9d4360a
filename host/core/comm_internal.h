/* comm_internal.h: the comm backend tables shared by comm.c, the host
 * backends (comm_self.c, comm_mpi.c) and comm_nccl.c. Not part of the public
 * C API.
 *
 * comm.c validates tensors, runs the mismatch check and picks a backend per
 * call: a world of one uses the local "self" backend for every device, cpu
 * tensors go to the host backend (MPI), cuda tensors to NCCL. Backends see raw
 * pointers, byte or element counts and the device; they never look at
 * tensors, so validation and messages live in one place.
 *
 * A host backend also owns the world: it is started by a launcher, splits
 * and frees communicators, and carries the small control traffic (barrier,
 * the mismatch check, the NCCL bootstrap). Adding one (gloo, UCC) is one
 * file defining a ws_comm_host_ops and one entry in comm_backends.c. */
#ifndef WS_COMM_INTERNAL_H
#define WS_COMM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "device.h"
#include "dtype.h"
#include "status.h"
#include "tensor.h"

typedef struct ws_nccl_state ws_nccl_state;

/* One backend. `req` NULL: the call completes before returning. Otherwise
 * the backend stores what it needs in req->impl and completes it in wait(). */
typedef struct ws_comm_ops {
    const char *name;
    ws_status (*all_gather)(ws_comm *c, ws_device *d, const void *send, void *recv,
                            size_t bytes_per_rank, ws_comm_request *req);
    ws_status (*broadcast)(ws_comm *c, ws_device *d, void *buf, size_t bytes, int root,
                           ws_comm_request *req);
    ws_status (*send)(ws_comm *c, ws_device *d, const void *buf, size_t bytes, int peer,
                      ws_comm_request *req);
    ws_status (*recv)(ws_comm *c, ws_device *d, void *buf, size_t bytes, int peer,
                      ws_comm_request *req);
    ws_status (*all_reduce)(ws_comm *c, ws_device *d, void *buf, size_t count, ws_dtype t,
                            ws_reduce_op op, ws_comm_request *req);
    /* recv gets count_per_rank elements: block `rank` of the reduction. */
    ws_status (*reduce_scatter)(ws_comm *c, ws_device *d, const void *send, void *recv,
                                size_t count_per_rank, ws_dtype t, ws_reduce_op op,
                                ws_comm_request *req);
    /* Byte counts and displacements per rank (size entries each); the
     * backend copies what it must keep until wait. */
    ws_status (*all_to_all)(ws_comm *c, ws_device *d, const void *send, const size_t *send_counts,
                            const size_t *send_displs, void *recv, const size_t *recv_counts,
                            const size_t *recv_displs, ws_comm_request *req);
    /* Point-to-point messages over scattered runs (see ws_comm_transfer);
     * NULL where the backend has none. */
    ws_status (*transfer)(ws_comm *c, ws_device *d, const ws_comm_msg *msgs, size_t n,
                          ws_comm_request *req);
    ws_status (*wait)(ws_comm_request *req);
} ws_comm_ops;

/* A host backend: moves cpu tensors (`data`) and runs the world. */
typedef struct ws_comm_host_ops {
    ws_comm_ops data;
    /* 1 when this backend's launcher started the process. */
    int (*launched)(void);
    /* Joins the world: fills c->rank, size, local_rank and c->host_impl. */
    ws_status (*init_world)(ws_comm *c);
    /* As MPI_Comm_split; *undefined = 1 (and child untouched) for color < 0.
     * Fills child->rank, size and host_impl. */
    ws_status (*split)(ws_comm *parent, int color, int key, ws_comm *child, int *undefined);
    void (*free)(ws_comm *c); /* releases c->host_impl; the world's too at shutdown */
    ws_status (*barrier)(ws_comm *c);
    /* Element-wise max over ranks of a small i64 vector, in place. */
    ws_status (*max_i64)(ws_comm *c, int64_t *v, int n);
    /* all[r * n + i] = rank r's mine[i]. */
    ws_status (*gather_i64)(ws_comm *c, const int64_t *mine, int n, int64_t *all);
    /* recv[q] = what rank q passed as its send[this rank] (one each). */
    ws_status (*exchange_i64)(ws_comm *c, const int64_t *send, int64_t *recv);
    /* Raw bytes from root to all (the NCCL bootstrap). */
    ws_status (*bcast_bytes)(ws_comm *c, void *buf, size_t bytes, int root);
    /* Times the backend's own all_gather / broadcast / all_to_all on malloc'd
     * buffers. */
    ws_status (*reference)(ws_comm *c, const char *op, size_t bytes, int iters,
                           double *seconds_per_iter);
    /* Ends every rank of the job; returns when the backend never started. */
    void (*abort)(int exit_code);
    void (*finalize)(void); /* at shutdown, after free of the world */
    /* Why a task of a multi-task job without this backend's launch
     * environment cannot join, and how to start it: follows "but ". */
    const char *launch_hint;
} ws_comm_host_ops;

/* Largest number of tensors a request marks written (or keeps alive) when it
 * completes. */
#define WS_COMM_REQ_TENSORS 2

/* Work done after the transfer completes (all_gather into a list). */
typedef struct ws_comm_unpack {
    ws_tensor staging;        /* owned: the contiguous recv buffer */
    ws_tensor **dsts;         /* owned array of borrowed tensors */
    size_t n;
} ws_comm_unpack;

struct ws_comm_request {
    ws_comm *comm;
    const ws_comm_ops *ops;
    const char *what;         /* "all_gather", ... for messages */
    void *impl;               /* backend state, freed by ops->wait */
    /* Shallow copies holding a storage reference, so the bytes stay valid
     * even if the caller frees its tensor before waiting. */
    ws_tensor keep[WS_COMM_REQ_TENSORS];
    int n_keep;
    int written_mask;         /* bit i: keep[i] is an output */
    ws_comm_unpack unpack;
};

struct ws_comm {
    int rank, size, local_rank;
    int is_world;
    int check;                /* run the mismatch check before collectives */
    const ws_comm_host_ops *host; /* self or mpi */
    void *host_impl;          /* the host backend's communicator */
    ws_nccl_state *nccl;      /* created on first cuda collective with size > 1 */
    char backend[16];
};

/* ---- host backends ------------------------------------------------------- */
const ws_comm_host_ops *ws_comm_self_ops(void); /* comm_self.c: a world of one */
/* comm_backends.c: the host backends built in, in order of preference,
 * ending with NULL; self is not among them. */
extern const ws_comm_host_ops *const ws_comm_host_backends[];
extern const ws_comm_host_ops ws_comm_mpi_ops; /* comm_mpi.c */

/* comm_watch.c: a thread that ends this rank, naming the lost one, when a
 * rank on this node dies without leaving the job (kill -9, a crash). Joins
 * one small gather, so every rank of the world calls it. */
ws_status ws_comm_watch_peers(ws_comm *c);
void ws_comm_unwatch_peers(void); /* before the backend finalizes */

/* ---- NCCL (comm_nccl.c) ---------------------------------------------------- */
/* Loads libnccl.so.2 (WSHOST_NCCL_LIBRARY overrides the path) and creates the
 * comm's NCCL communicator, bootstrapped over the host backend. */
ws_status ws_nccl_ensure(ws_comm *c, ws_device *d);
const ws_comm_ops *ws_comm_nccl_ops(void);
void ws_nccl_destroy(ws_comm *c);
/* Aborts every NCCL communicator that was created (before MPI_Abort). */
void ws_nccl_abort_all(void);

#endif
